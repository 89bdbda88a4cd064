"""The one pass manager: runs cinfer's passes over a Dynamo graph in a fixed order and reports what they rewrote.

Order (each pass is a plain ``GraphModule -> int`` function in its own module):

1. ``attention``           (``attention_pass.rewrite_attention``)          -- only for a paged graph (marker present)
2. ``rope``                (``rope_pass.fuse_rope_kv_cache_write``)        -- only for a paged graph; needs 1's
   ``cinfer.kv_cache_write``; q/k RoPE + the cache write -> ``cinfer.rope_kv_cache_write``
3. ``rms_norm``            (``rms_norm_pass.fuse_rms_norm``)
4. ``fused_add_rms_norm``  (``fused_add_rms_norm_pass.fuse_add_rms_norm``) -- needs 3's ``cinfer.rms_norm`` nodes
5. ``fuse_projections``    (``fuse_projections_pass.fuse_projections``)    -- needs the real weights
   (``example_inputs``); stacks q/k/v and gate/up, re-pointing the fused parameters' ``.data`` into the stacks
   (after 2, whose op then reads q/k/v as column slices of the fused output: it takes strided inputs)
6. ``linear``              (``linear_pass.route_linears``)                 -- after 5, so fused projections are
   included; ``F.linear`` -> ``cinfer.linear`` (a streaming kernel for few-row steps on the GPU)
7. ``silu_mul``            (``silu_mul_pass.fuse_silu_mul``)                -- a gated MLP's ``silu(gate) * up`` ->
   ``cinfer.silu_mul`` (a kernel launched like the others, with programmatic dependent launch)
8. ``linear_silu_mul``     (``silu_mul_pass.fuse_linear_silu_mul``)         -- needs 5, 6 and 7: ``cinfer.silu_mul``
   of the two halves of a fused gate/up ``cinfer.linear`` -> ``cinfer.linear_silu_mul`` (one streaming kernel)
9. ``norm_split``          (``norm_linear_pass.split_norms``)               -- needs 4, 6 and 8: a
   ``cinfer.fused_add_rms_norm`` between a ``cinfer.linear`` and the projections of its output ->
   ``cinfer.linear_add_rms_stats`` + ``cinfer.rms_stats_linear[_silu_mul]`` (no norm kernel between them)
10. ``rope_attention``     (``rope_attention_pass.fuse_rope_attention``)    -- only for a paged graph; needs 2's
   ``cinfer.rope_kv_cache_write``: it and the layer's ``cinfer.paged_attention`` -> ``cinfer.rope_paged_attention``
   (at decode one kernel); last, so no later pass sees the fused op

The passes run inside ``fx_utils.passes_deferred``: the graph's code is regenerated once, after the last pass, and the
fake values of the nodes they insert are computed when a later pass reads them, or after the last pass.

For a paged graph the attention pass must rewrite exactly one site per layer, otherwise ``GraphRewriteError``
names the model class, the pattern and why each candidate was rejected: there is no silent eager fallback.
The RoPE pass is an optimisation: a layer whose RoPE does not match keeps its ``kv_cache_write`` (logged); so is
the RoPE + attention pass: a layer it does not fuse keeps its two ops (logged).
"""
import logging

from torch import fx

from graph_passes.attention_pass import PATTERN, rewrite_attention
from graph_passes.errors import GraphRewriteError
from graph_passes.fuse_projections_pass import fuse_projections
from graph_passes.fused_add_rms_norm_pass import fuse_add_rms_norm
from graph_passes.fx_utils import is_op, passes_deferred
from graph_passes.linear_pass import route_linears
from graph_passes.norm_linear_pass import split_norms
from graph_passes.paged_inputs import PagedInputs
from graph_passes.rms_norm_pass import fuse_rms_norm
from graph_passes.rope_attention_pass import fuse_rope_attention
from graph_passes.rope_pass import fuse_rope_kv_cache_write
from graph_passes.silu_mul_pass import fuse_linear_silu_mul, fuse_silu_mul

logger = logging.getLogger(__name__)

PASS_ORDER = ("attention", "rope", "rms_norm", "fused_add_rms_norm", "fuse_projections", "linear", "silu_mul",
              "linear_silu_mul", "norm_split", "rope_attention")


def model_class_name(gm: fx.GraphModule) -> str:
    """The class of the outermost module Dynamo traced into (e.g. ``LlamaForCausalLM``), for messages."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            return next(iter(stack.values()))[1].__name__
    return type(gm).__name__


def _optional_pass(fuse, gm: fx.GraphModule, model_name: str, num_layers: int | None, done: str,
                   others: str) -> int:
    """Run an optimisation pass ``fuse(gm, rejected)``; the layers it left alone are logged, not raised."""
    rejected: list[str] = []
    count = fuse(gm, rejected)
    if rejected:
        logger.info("%s: %s in %d of %d layers; %s: %s", model_name, done, count, num_layers, others,
                    "; ".join(rejected))
    return count


def run_passes(gm: fx.GraphModule, example_inputs: list | None = None, *, num_layers: int | None = None,
               model_name: str | None = None) -> dict[str, int]:
    """Rewrite ``gm`` in place; returns the sites rewritten per pass, in ``PASS_ORDER``.

    ``example_inputs``: the backend's, one per placeholder (the parameters among them are the model's real ones);
    without them the projection pass can fuse only ``get_attr`` weights. Updated in place for the inner compiler
    (see ``fuse_projections``): pass a copy, and hand that copy on.

    ``num_layers``: for a paged graph (built by ``compile_model``), the number of attention layers that must be
    rewritten. ``None`` means a plain model call: attention is left to SDPA; the norm and projection passes run.
    """
    model_name = model_name or model_class_name(gm)
    report: dict[str, int] = {}
    paged = PagedInputs.find(gm) is not None
    if num_layers is not None and not paged:
        raise GraphRewriteError(f"{model_name}: the graph has no paged inputs (bind_paged_inputs marker missing)")

    with passes_deferred(gm):
        if paged:
            rejected: list[str] = []
            report["attention"] = rewrite_attention(gm, rejected)
            if report["attention"] != num_layers:
                details = "; ".join(rejected) if rejected else (
                    "no scaled_dot_product_attention and no eager softmax attention in the graph")
                raise GraphRewriteError(
                    f"{model_name}: the attention pass rewrote {report['attention']} of {num_layers} layers. "
                    f"Pattern not found: {PATTERN}. Candidates rejected: {details}")
            leftover = [n.name for n in gm.graph.nodes if is_op(n, "sdpa")]
            if leftover:
                raise GraphRewriteError(f"{model_name}: scaled_dot_product_attention left after the attention pass: "
                                        f"{leftover}")
            report["rope"] = _optional_pass(fuse_rope_kv_cache_write, gm, model_name, num_layers,
                                            "RoPE fused with the cache write",
                                            "the others keep HF's RoPE and kv_cache_write")
        else:
            report["attention"] = report["rope"] = 0
            logger.info("%s: no paged cache bound to this graph, so attention is left to SDPA / eager attention "
                        "(only the norm and projection passes run)", model_name)

        report["rms_norm"] = fuse_rms_norm(gm)
        report["fused_add_rms_norm"] = fuse_add_rms_norm(gm)
        report["fuse_projections"] = fuse_projections(gm, example_inputs)
        report["linear"] = route_linears(gm)
        report["silu_mul"] = fuse_silu_mul(gm)
        report["linear_silu_mul"] = fuse_linear_silu_mul(gm)
        report["norm_split"] = split_norms(gm)
        report["rope_attention"] = _optional_pass(fuse_rope_attention, gm, model_name, num_layers,
                                                  "RoPE/cache write fused with attention",
                                                  "the others keep two ops") if paged else 0
    gm.graph.lint()
    logger.info("%s: graph passes rewrote %s", model_name, ", ".join(f"{k}={v}" for k, v in report.items()))
    return report
