"""``compile_model``: an unmodified HF causal LM compiled into one graph over the runtime's paged KV cache.

How the step's metadata and the caches enter the graph
------------------------------------------------------
``torch.compile`` (``fullgraph=True``) compiles a small step function, private to each ``PagedModel``::

    step(input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices,
         k_caches, v_caches):
        input_ids = cinfer_graph.bind_paged_inputs(input_ids, positions, slot_mapping, block_tables, seq_lens,
                                                   query_start_loc, k_caches, v_caches)
        return model(input_ids=input_ids, position_ids=positions, use_cache=False,
                     logits_to_keep=logits_indices).logits[0]

Dynamo traces straight through the HF code, so the graph holds HF's embedding, projections, RoPE (computed from
``position_ids`` as usual), causal-mask construction, SDPA / eager attention, norms and ``lm_head`` over the rows
``logits_indices`` selects. The marker keeps the metadata and caches as graph inputs; our backend runs the pass
manager (``pass_manager.PASS_ORDER``), which wires them into ``cinfer.kv_cache_write`` / ``cinfer.paged_attention``,
erases the marker and the now-dead mask, fuses each layer's q/k RoPE with its cache write
(``cinfer.rope_kv_cache_write``), stacks each layer's q/k/v and gate/up weights into one projection each (re-pointing
the model's parameters into the stacked tensors), fuses each layer's RoPE/cache write with its attention
(``cinfer.rope_paged_attention``), then hands the graph to Inductor piece by piece: ``layer_split`` cuts it into
prologue, one piece per decoder layer and epilogue, and compiles each distinct piece once (four compiles for a Llama
model of any depth). Everything stays inside one ``torch.compile``; the caches are written in place through the ops'
``Tensor(a!)`` arguments.

When the model's layers 1 to N-1 are interchangeable (``layer_replication``), ``model`` above is a shallow copy
holding layers 0 and 1 only, and the step passes their two caches: Dynamo traces and the passes rewrite two layers,
and the compiled step calls layer 1's compiled piece once more for each further layer, with that layer's weights
and caches. The user's model is not modified.

Dynamic shapes (the rules the runtime relies on)
------------------------------------------------
One graph serves every mix of prefill and decode sequences. ``PagedModel.__call__`` marks dynamic: the token dim
of ``input_ids`` / ``positions`` / ``slot_mapping``, the batch dim of ``block_tables`` / ``seq_lens`` /
``query_start_loc`` / ``logits_indices`` and ``block_tables``' ``max_blocks_per_seq`` dim. Two Dynamo habits
would otherwise cause recompiles, and both are handled here, so the runtime needs no special warm-up shapes:

- 0/1 specialization: Dynamo compiles a separate graph for a dim of size 1 (one token, one sequence, one block
  per sequence). ``__call__`` pads such a dim to 2 before the compiled graph sees it: an extra token (a copy of
  the last one, slot ``-1`` so nothing is written, outside every sequence since ``query_start_loc[-1]`` is
  unchanged), an extra sequence (``seq_len 0``, no new tokens, its logits row dropped) or an extra block-table
  column. The padding is a few small device ops (no host sync), recorded like any other op under CUDA-graph
  capture. Kernels must therefore accept a sequence with ``seq_len == 0`` and ``q_len == 0`` (and skip it).
  One sequence of two tokens gets two extra sequences: the ops take a step of as many tokens as sequences for a
  decode step, at most one query token per sequence (``cinfer_ops.rope_paged_attention`` relies on it).
- duck sizing: dims that happen to be equal at the first call would share one symbol and later unequal sizes
  would recompile; the compiled call runs with duck sizing off.

The caches' block count is dynamic too (it follows free device memory, which differs between processes), so
the same model and engine settings give the same graph, and a restart reuses Inductor's on-disk caches. It also
lets ``PagedModel.set_caches`` swap in caches of another block count without recompiling: the engine warms up
over a few blocks, measures its peak memory, then gives the rest of the device to the cache.

So after the first (warm-up) call, any ``[1, N]`` step with any batch composition runs the same graph, without
recompiling. Changing dtype/device of the inputs, grad mode, or the number of caches does recompile.

CUDA graphs: the compiled call does no host syncs (the padding decisions read shapes only, and the GPU ops are
Triton kernels); its outputs come from the capture's memory pool. Capture after the warm-up call.
"""
import contextlib
import itertools
import logging
import time
import types

import torch
import torch.nn.functional as F
from torch import Tensor, fx

import cinfer_ops  # noqa: F401  (registers torch.ops.cinfer.*)
from graph_passes.attention_metadata import AttentionMetadata
from graph_passes.backend import compile_inner
from graph_passes.errors import GraphRewriteError
from graph_passes.fx_utils import op_counts
from graph_passes.layer_replication import TRACED_LAYERS, LayerReplication, replicable_layers, truncated_model
from graph_passes.layer_split import SplitReport, compile_by_layer
from graph_passes.paged_inputs import bind_paged_inputs  # noqa: F401  (registers the marker op)
from graph_passes.pass_manager import run_passes

logger = logging.getLogger(__name__)

_step_ids = itertools.count()


def _make_step(model: torch.nn.Module):
    def step(input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices,
             k_caches, v_caches):
        input_ids = torch.ops.cinfer_graph.bind_paged_inputs(
            input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, k_caches, v_caches)
        out = model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=logits_indices)
        return out.logits[0]

    # Dynamo keeps compiled graphs (and their recompile budget) on the code object. A private copy per model keeps
    # one model's graph from being checked against, or counted with, every other model's.
    code = step.__code__.replace(co_name=f"cinfer_step_{next(_step_ids)}")
    return types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)


def _no_duck_shapes():
    config = torch.fx.experimental._config
    if hasattr(config, "use_duck_shape"):
        return config.patch(use_duck_shape=False)
    return contextlib.nullcontext()


def _pad_dims_of_one(input_ids: Tensor, positions: Tensor, meta: AttentionMetadata):
    """Pad size-1 dims to 2 (see the module docstring); returns the step's 7 tensors and the real batch size."""
    slot_mapping, block_tables, seq_lens = meta.slot_mapping, meta.block_tables, meta.seq_lens
    query_start_loc, logits_indices = meta.query_start_loc, meta.logits_indices
    batch = logits_indices.shape[0]
    two_tokens = input_ids.shape[1] == 2  # real ones
    if input_ids.shape[1] == 1:
        input_ids = torch.cat([input_ids, input_ids], dim=1)
        positions = torch.cat([positions, positions], dim=1)
        slot_mapping = F.pad(slot_mapping, (0, 1), value=-1)
    if block_tables.shape[0] == 1:
        extra = 2 if two_tokens else 1  # not 2 tokens over 2 sequences (see the module doc)
        block_tables = F.pad(block_tables, (0, 0, 0, extra))
        seq_lens = F.pad(seq_lens, (0, extra))
        query_start_loc = torch.cat([query_start_loc] + [query_start_loc[-1:]] * extra)
    if logits_indices.shape[0] == 1:
        logits_indices = F.pad(logits_indices, (0, 1))
    if block_tables.shape[1] == 1:
        block_tables = F.pad(block_tables, (0, 1))
    return (input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices), batch


_DYNAMIC_DIMS = ((1,), (1,), (0,), (0, 1), (0,), (0,), (0,))


def _prepare_step(input_ids: Tensor, positions: Tensor, meta: AttentionMetadata):
    """The step's 7 tensors, size-1 dims padded and the shape-varying dims marked dynamic; and the real batch."""
    args, batch = _pad_dims_of_one(input_ids, positions, meta)
    for tensor, dims in zip(args, _DYNAMIC_DIMS):
        for dim in dims:
            torch._dynamo.mark_dynamic(tensor, dim)
    return args, batch


def capture_step_graph(model: torch.nn.Module, k_caches: list[Tensor], v_caches: list[Tensor], input_ids: Tensor,
                       positions: Tensor, meta: AttentionMetadata) -> fx.GraphModule:
    """The Dynamo graph ``compile_model`` hands its passes, before any pass ran (marker op included); for tests and
    for debugging a model the passes reject. Runs the step once, unrewritten (no cache writes)."""
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    step = torch.compile(_make_step(model), backend=backend, fullgraph=True)
    args, _ = _prepare_step(input_ids, positions, meta)
    with torch.no_grad(), _no_duck_shapes():
        step(*args, list(k_caches), list(v_caches))
    return captured[0]


class PagedModel:
    """An HF causal LM compiled over paged KV caches. Build with ``compile_model``.

    Attributes: ``report`` (sites rewritten per pass, filled by the first call), ``graph_module`` (the rewritten
    FX graph, before ``layer_split`` cut it into pieces for the inner backend), ``ops_before`` / ``ops_after`` (op
    counts of the Dynamo graph), ``split_report`` (pieces, and how many were compiled; see ``layer_split``),
    ``traced_layers`` (the layers Dynamo traced, which those figures count: 2 when ``replication`` runs the others,
    see ``layer_replication``).
    """

    def __init__(self, model: torch.nn.Module, k_caches: list[Tensor], v_caches: list[Tensor], inner_backend: str):
        self.model = model
        # Dynamo traces the first two layers only when the others are interchangeable with layer 1
        # (layer_replication); the compiled step still runs every layer.
        self.replication = LayerReplication(model) if replicable_layers(model) else None
        self.traced_layers = TRACED_LAYERS if self.replication is not None else len(k_caches)
        traced_model = truncated_model(model, TRACED_LAYERS) if self.replication is not None else model
        self._bind_caches(k_caches, v_caches)
        self.inner_backend = inner_backend
        self.report: dict[str, int] = {}
        self.compile_times: dict[str, float] = {}  # seconds in the graph passes and in the inner compiler
        self.graph_module: fx.GraphModule | None = None
        self.ops_before = None
        self.ops_after = None
        self.split_report: SplitReport | None = None
        self._step = torch.compile(_make_step(traced_model), backend=self._backend, fullgraph=True)

    def set_caches(self, k_caches: list[Tensor], v_caches: list[Tensor]) -> None:
        """Run over other caches from the next call on: one K and one V tensor per layer, contiguous, shaped like
        the current ones except for the block count (the same for all), in their dtype and on their device. The
        compiled graph takes the caches as inputs with a symbolic block count, so this does not recompile (the
        engine sizes its cache after a warm-up over a few blocks). Call it before capturing CUDA graphs, which
        keep the addresses of the caches they were captured over."""
        _check_caches(len(self.k_caches), k_caches, v_caches)
        current = self.k_caches[0]
        num_blocks = k_caches[0].shape[0]
        for cache in list(k_caches) + list(v_caches):
            if (cache.shape != (num_blocks, *current.shape[1:]) or cache.dtype != current.dtype
                    or cache.device != current.device):
                raise ValueError(f"new caches must all be [num_blocks, {', '.join(map(str, current.shape[1:]))}] "
                                 f"{current.dtype} on {current.device}, like the current ones, got "
                                 f"{tuple(cache.shape)} {cache.dtype} on {cache.device}")
        self._bind_caches(k_caches, v_caches)

    def _bind_caches(self, k_caches: list[Tensor], v_caches: list[Tensor]) -> None:
        self.k_caches = list(k_caches)
        self.v_caches = list(v_caches)
        if self.replication is not None:
            self.replication.bind_caches(self.k_caches, self.v_caches)
        for cache in self.k_caches + self.v_caches:
            # The number of blocks follows free device memory, so it differs between processes; as a symbol
            # it stays out of the compiled graph, and a restart hits Inductor's caches instead of recompiling.
            torch._dynamo.maybe_mark_dynamic(cache, 0)

    def _backend(self, gm: fx.GraphModule, example_inputs: list):
        start = time.perf_counter()
        self.ops_before = op_counts(gm)
        example_inputs = list(example_inputs)  # the projection pass swaps in fakes for the parameters it re-pointed
        self.report = run_passes(gm, example_inputs, num_layers=self.traced_layers,
                                 model_name=type(self.model).__name__)
        self.ops_after = op_counts(gm)
        self.graph_module = gm
        self.compile_times["passes_s"] = time.perf_counter() - start
        start = time.perf_counter()
        compiled, self.split_report = compile_by_layer(
            gm, example_inputs, lambda piece, args: compile_inner(piece, args, self.inner_backend),
            replication=self.replication)
        self.compile_times["inner_compile_s"] = time.perf_counter() - start
        return compiled

    def __call__(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        """input_ids, positions: int64 [1, num_tokens] (the step's tokens, flattened). Writes this step's K/V into
        the caches and returns float logits [batch, vocab] of each sequence's last new token (rows of
        ``meta.logits_indices``), in the model's dtype."""
        args, batch = _prepare_step(input_ids, positions, meta)
        try:
            with torch.no_grad(), _no_duck_shapes():
                t = self.traced_layers
                logits = self._step(*args, self.k_caches[:t], self.v_caches[:t])
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if isinstance(e.inner_exception, GraphRewriteError):
                raise e.inner_exception from None
            raise
        except torch._dynamo.exc.Unsupported as e:
            raise GraphRewriteError(f"{type(self.model).__name__}: Dynamo could not capture the forward as one "
                                    f"graph, so the passes cannot rewrite it: {e}") from e
        return logits[:batch] if logits.shape[0] != batch else logits


def attention_window(config) -> int | None:
    """The sliding-window size of an HF text config whose attention uses one (Mistral v0.1, Qwen2 with
    ``use_sliding_window``), else None. The paged attention op is full causal, so contexts must stay within it."""
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    if layer_types and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _warn_sliding_window(config) -> None:
    window = attention_window(config)
    max_len = getattr(config, "max_position_embeddings", None)
    if window is not None and max_len is not None and window < max_len:
        logger.warning("%s has sliding-window attention (window %s); cinfer's paged attention is full causal, "
                       "so results match HF only for contexts of at most %s tokens (cinfer_runtime.compile caps "
                       "max_model_len there)", config.model_type, window, window)


def _check_caches(num_layers: int, k_caches: list[Tensor], v_caches: list[Tensor]) -> None:
    if len(k_caches) != num_layers or len(v_caches) != num_layers:
        raise ValueError(f"expected {num_layers} k and v caches (one per layer), got {len(k_caches)} and "
                         f"{len(v_caches)}")
    for k, v in zip(k_caches, v_caches):
        if k.dim() != 4 or k.shape != v.shape or not k.is_contiguous() or not v.is_contiguous():
            raise ValueError(f"caches must be contiguous [num_blocks, block_size, num_kv_heads, head_dim] pairs, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")


def compile_model(model: torch.nn.Module, k_caches: list[Tensor], v_caches: list[Tensor], *,
                  inner_backend: str = "inductor") -> PagedModel:
    """Compile an HF causal LM (Llama, Mistral, Qwen2 family) over the runtime's paged KV caches.

    ``k_caches`` / ``v_caches``: one tensor per layer, ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the
    model's dtype and device. Compilation happens at the first call, which raises ``GraphRewriteError`` if an
    attention layer (or the whole forward) cannot be rewritten. ``inner_backend``: "inductor", or "eager" /
    "aot_eager" to skip Inductor (tests).
    """
    config = model.config
    _check_caches(config.num_hidden_layers, k_caches, v_caches)
    _warn_sliding_window(config)
    return PagedModel(model, k_caches, v_caches, inner_backend)
