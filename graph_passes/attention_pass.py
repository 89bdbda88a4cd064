"""Attention pass: each HF attention site -> ``cinfer.kv_cache_write`` + ``cinfer.paged_attention``.

The graph is Dynamo's capture of the HF model called on the step's flattened tokens ``[1, num_tokens]`` with
``use_cache=False`` (so no HF cache update is in the graph), the paged inputs bound by the marker op of
``graph_passes.paged_inputs``. Per layer, HF computes

    q, k, v  [1, heads, num_tokens, head_dim]   (k after RoPE; k/v have num_kv_heads heads)
    k, v  <- repeat_kv(k, v)  (expand + reshape, or repeat_interleave)  -- absent for MHA or SDPA's enable_gqa
    out   <- scaled_dot_product_attention(q, k, v, attn_mask=<causal mask>, is_causal=..., scale=s)
         or  matmul(softmax(matmul(q, k^T) * s + mask, -1).to(dtype) [dropout p=0], v)   (eager attention)

A site fires only when it is causal: ``is_causal=True`` without mask, or a mask computed in the graph from the
positions alone (HF's causal / packed-sequence mask; a mask that reads parameters, e.g. a learned bias, does not
match), dropout is zero, q has the step's token count, and k/v reach ``num_kv_heads`` heads once ``repeat_kv`` is
peeled off. It is replaced by

    kv_cache_write(k_tok, v_tok, k_cache[i], v_cache[i], slot_mapping)          # k_tok: [num_tokens, kv_heads, D]
    o = paged_attention(q_tok, k_cache[i], v_cache[i], block_tables, seq_lens, query_start_loc, s)
    out <- o.transpose(0, 1).unsqueeze(0)                                        # back to [1, heads, N, D]

with ``i`` the site's index in graph order (= layer order). The mask computation and ``repeat_kv`` become dead and
are removed, and the marker is replaced by the ``input_ids`` it wraps. Known limit: a mask derived from positions
is taken to be causal, so a sliding-window mask is replaced by full causal attention (``compile_model`` warns).
"""
import logging
from dataclasses import dataclass

import torch
from torch import fx

from graph_passes.errors import GraphRewriteError
from graph_passes.fx_utils import arg, fake, finish_pass, is_dtype_cast, is_op, only_user, same_size, set_fake
from graph_passes.paged_inputs import PagedInputs

logger = logging.getLogger(__name__)

PATTERN = ("per layer: q/k/v [1, heads, tokens, head_dim] -> [repeat_kv] -> scaled_dot_product_attention(causal) "
           "or eager matmul(softmax(q @ k^T * scale + causal_mask), v)")


@dataclass
class AttentionSite:
    query: fx.Node      # [1, num_heads, num_tokens, head_dim]
    key: fx.Node        # [1, num_kv_heads, num_tokens, head_dim], before repeat_kv
    value: fx.Node
    scale: float
    output: fx.Node     # the node whose value ([1, num_heads, num_tokens, head_dim]) the paged output replaces


def _unrepeat_kv(node: fx.Node) -> fx.Node:
    """The [1, kv_heads, N, D] tensor behind HF's ``repeat_kv`` (or ``repeat_interleave`` on dim 1), else ``node``."""
    if is_op(node, "repeat_interleave") and arg(node, 2, "dim") == 1:
        return node.args[0]
    if is_op(node, "reshape") and is_op(node.args[0], "expand"):
        expanded = node.args[0].args[0]
        if is_op(expanded, "unsqueeze") and arg(expanded, 1, "dim") == 2:
            return expanded.args[0]
        if is_op(expanded, "getitem"):
            index = expanded.args[1]
            if isinstance(index, tuple) and len(index) >= 3 and index[2] is None \
                    and all(i == slice(None) for i in index[:2]):
                return expanded.args[0]
    return node


def _mask_is_positional(mask: fx.Node, paged: PagedInputs) -> bool:
    """True when ``mask`` is computed from the positions / token ids only (no parameters, no other inputs)."""
    allowed = {paged.positions, paged.input_ids, paged.marker}
    seen, stack = set(), [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in allowed:
            continue  # the marker reads the caches and metadata; what the mask may use of it is the token ids
        if node.op in ("placeholder", "get_attr") and isinstance(fake(node), torch.Tensor):
            return False
        stack.extend(node.all_input_nodes)
    return True


def _scores_scale(scores: fx.Node) -> tuple[fx.Node, float] | None:
    """Peel ``* c`` / ``/ c`` off the attention scores; returns (matmul node, scale)."""
    scale = 1.0
    while is_op(scores, "mul", "div") and len(scores.args) == 2:
        a, b = scores.args
        if is_op(scores, "mul") and isinstance(a, int | float):
            a, b = b, a
        if not isinstance(b, int | float) or isinstance(b, bool):
            return None
        scale = scale * b if is_op(scores, "mul") else scale / b
        scores = a
    return (scores, scale) if is_op(scores, "matmul") else None


def _transposed_last_two(node) -> fx.Node | None:
    if not is_op(node, "transpose") or len(node.args) != 3:
        return None
    dims = {d % 4 for d in node.args[1:] if isinstance(d, int)}
    return node.args[0] if dims == {2, 3} else None


def match_sdpa(node: fx.Node, paged: PagedInputs) -> AttentionSite | str:
    """An SDPA call as an attention site, or the reason it is not one."""
    query, key, value = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask, dropout = arg(node, 3, "attn_mask"), arg(node, 4, "dropout_p", 0.0)
    is_causal, scale = arg(node, 5, "is_causal", False), arg(node, 6, "scale")
    if dropout != 0.0:
        return f"dropout_p={dropout}"
    if not isinstance(is_causal, bool):
        return f"is_causal is not a constant ({is_causal})"
    if mask is None and not is_causal:
        return "neither a mask nor is_causal: attention is not causal"
    if mask is not None and (is_causal or not _mask_is_positional(mask, paged)):
        return "attn_mask is not a causal mask computed from the positions"
    if scale is not None and not isinstance(scale, int | float):
        return f"scale is not a constant ({scale})"
    q_val = fake(query)
    if scale is None and q_val is not None:
        scale = float(q_val.shape[-1]) ** -0.5
    return AttentionSite(query, _unrepeat_kv(key), _unrepeat_kv(value), float(scale), node)


def match_eager(softmax: fx.Node, paged: PagedInputs) -> AttentionSite | str:
    """HF's eager attention around ``softmax`` as an attention site, or the reason it is not one."""
    dim = arg(softmax, 1, "dim")
    probs_val = fake(softmax)
    if probs_val is None or probs_val.dim() != 4 or not isinstance(dim, int) or dim % 4 != 3:
        return "softmax is not over the last dim of 4-D scores"
    logits = softmax.args[0]
    mask = None
    if is_op(logits, "add") and len(logits.args) == 2:
        a, b = logits.args
        scores = a if _scores_scale(a) is not None else b
        mask = b if scores is a else a
        logits = scores
    peeled = _scores_scale(logits)
    if peeled is None:
        return "softmax input is not (q @ k^T) * scale [+ mask]"
    matmul, scale = peeled
    query, key = matmul.args[0], _transposed_last_two(matmul.args[1])
    if key is None:
        return "scores are not q @ k.transpose(2, 3)"
    if mask is None:
        return "no mask: eager attention is not causal"
    if not isinstance(mask, fx.Node) or not _mask_is_positional(mask, paged):
        return "mask is not a causal mask computed from the positions"
    probs = softmax
    while (user := only_user(probs)) is not None and (
            is_dtype_cast(user) or (is_op(user, "dropout") and (arg(user, 1, "p", 0.5) == 0.0
                                                                 or arg(user, 2, "training", True) is False))):
        probs = user
    out = only_user(probs)
    if not is_op(out, "matmul") or out.args[0] is not probs:
        return "attention probabilities do not feed one matmul with v"
    return AttentionSite(query, _unrepeat_kv(key), _unrepeat_kv(out.args[1]), scale, out)


def _check_shapes(site: AttentionSite, paged: PagedInputs, layer: int) -> str | None:
    q, k, v = fake(site.query), fake(site.key), fake(site.value)
    tokens = fake(paged.input_ids).shape[1]
    cache = fake(paged.k_caches[layer])
    if q is None or k is None or v is None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q/k/v are not 4-D tensors"
    if not all(same_size(t.shape[0], 1) and same_size(t.shape[2], tokens) for t in (q, k, v)):
        return "q/k/v are not [1, heads, num_tokens, head_dim] over the step's tokens"
    if not (same_size(k.shape[1], v.shape[1]) and same_size(k.shape[3], q.shape[3])
            and same_size(v.shape[3], q.shape[3])):
        return "k/v heads or head_dim differ from q's"
    if not (same_size(k.shape[1], cache.shape[2]) and same_size(k.shape[3], cache.shape[3])):
        return (f"k/v have {k.shape[1]} heads of dim {k.shape[3]} (after undoing repeat_kv) but the cache of layer "
                f"{layer} is [blocks, block_size, {cache.shape[2]}, {cache.shape[3]}]")
    return None


def _tokens_major(graph: fx.Graph, node: fx.Node, contiguous: bool) -> list[fx.Node]:
    """[1, heads, N, D] -> [N, heads, D] (contiguous if asked); returns the new nodes, the result last."""
    squeezed = graph.call_method("squeeze", (node, 0))
    transposed = graph.call_method("transpose", (squeezed, 0, 1))
    if not contiguous:
        return [squeezed, transposed]
    return [squeezed, transposed, graph.call_method("contiguous", (transposed,))]


def _rewrite(gm: fx.GraphModule, site: AttentionSite, paged: PagedInputs, layer: int) -> None:
    graph = gm.graph
    k_cache, v_cache = paged.k_caches[layer], paged.v_caches[layer]
    new_nodes = []
    with graph.inserting_before(site.output):
        # q and k come out of RoPE, a fresh buffer Inductor can write token-major at no cost. v is a view of the
        # projection's output (with fused projections, a column slice of the qkv GEMM's): kv_cache_write takes any
        # token/head strides, and a .contiguous() there would cost a copy kernel per layer.
        layouts = [_tokens_major(graph, site.query, True), _tokens_major(graph, site.key, True),
                   _tokens_major(graph, site.value, False)]
        q_tok, k_tok, v_tok = (nodes[-1] for nodes in layouts)
        new_nodes += [n for nodes in layouts for n in nodes]
        write = graph.call_function(torch.ops.cinfer.kv_cache_write.default,
                                    (k_tok, v_tok, k_cache, v_cache, paged.slot_mapping))
        attn = graph.call_function(torch.ops.cinfer.paged_attention.default,
                                   (q_tok, k_cache, v_cache, paged.block_tables, paged.seq_lens,
                                    paged.query_start_loc, site.scale))
        heads_major = graph.call_method("transpose", (attn, 0, 1))
        out = graph.call_method("unsqueeze", (heads_major, 0))
        new_nodes += [write, attn, heads_major, out]
    for node in new_nodes:
        node.meta.update({k: v for k, v in site.output.meta.items() if k in ("nn_module_stack", "stack_trace")})
        set_fake(node)
    site.output.replace_all_uses_with(out)


def rewrite_attention(gm: fx.GraphModule, rejected: list[str] | None = None) -> int:
    """Rewrite every attention site of ``gm`` onto the paged caches bound by the marker op; returns the count.

    Without a marker (a plain model call, no paged cache) nothing is rewritten and 0 is returned. Sites that do
    not match are left as they are and described in ``rejected``; the pass manager decides whether that is fatal.
    """
    paged = PagedInputs.find(gm)
    if paged is None:
        return 0
    rejected = [] if rejected is None else rejected
    count = 0
    for node in list(gm.graph.nodes):
        if is_op(node, "sdpa"):
            site = match_sdpa(node, paged)
        elif is_op(node, "softmax"):
            site = match_eager(node, paged)
        else:
            continue
        if isinstance(site, AttentionSite):
            if count >= len(paged.k_caches):
                raise GraphRewriteError(f"more attention sites than the {len(paged.k_caches)} layer caches")
            site = _check_shapes(site, paged, count) or site
        if isinstance(site, str):
            kind = "scaled_dot_product_attention" if is_op(node, "sdpa") else "softmax"
            rejected.append(f"{node.name} ({kind}): {site}")
            logger.debug("attention: %s not rewritten: %s", node.name, site)
            continue
        _rewrite(gm, site, paged, count)
        count += 1
    paged.marker.replace_all_uses_with(paged.input_ids)
    gm.graph.erase_node(paged.marker)
    gm.graph.eliminate_dead_code()
    finish_pass(gm, True)
    return count
