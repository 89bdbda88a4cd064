"""RoPE pass: per layer, HF's q/k rotary embedding + ``cinfer.kv_cache_write`` -> one ``cinfer.rope_kv_cache_write``.

Runs right after the attention pass, on a paged graph. There, per layer, HF's ``apply_rotary_pos_emb`` reads

    cos_u = cos.unsqueeze(1); sin_u = sin.unsqueeze(1)        # cos, sin: [1, num_tokens, head_dim], one per model
    x_embed = x * cos_u + cat((-x[..., D/2:], x[..., :D/2]), dim=-1) * sin_u        # for x = q and x = k
                                                                                 # x: [1, heads, num_tokens, D]

and the attention pass made the results token-major for its ops::

    kv_cache_write(tokens_major(k_embed), v_tok, k_cache, v_cache, slot_mapping)
    o = paged_attention(tokens_major(q_embed), k_cache, v_cache, ...)      # tokens_major: squeeze(0).transpose(0, 1)
                                                                           # [.contiguous()]
A site is a ``kv_cache_write`` whose key is that RoPE of a pre-RoPE key, paired with the ``paged_attention`` of the
same caches whose query is the RoPE of a pre-RoPE query with the same cos and sin. It becomes

    q_rot = rope_kv_cache_write(tokens_major(q), tokens_major(k), v_tok, cos.squeeze(0), sin.squeeze(0),
                                k_cache, v_cache, slot_mapping)
    o = paged_attention(q_rot, k_cache, v_cache, ...)

where ``tokens_major(q)`` is a view of the projection's output (after ``fuse_projections``, a column slice of the
fused qkv GEMM's), so no copy is made. Both products and the sum may be written either way round (the add and
the muls commute). It fires only when that is exact: q, k, v, both RoPE results and the caches share one dtype
(fp32 / fp16 / bf16, so the op's one fp32 computation stands for Inductor's), cos/sin are [1, num_tokens,
head_dim], the slices split head_dim in halves, and the RoPE results (and their token-major copies) feed nothing
else. A layer that does not match is left as it was (RoPE fusion is an optimisation; the reason is logged).
"""
import logging

import torch
from torch import fx

from graph_passes.fx_utils import arg, fake, finish_pass, is_op, only_user, same_shape, same_size, set_fake

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_COPIED_META = ("nn_module_stack", "stack_trace")


def _untokens_major(node) -> fx.Node | str:
    """``x`` of ``x.squeeze(0).transpose(0, 1)[.contiguous()]`` (the attention pass's layout change), each step
    used only by the next."""
    if is_op(node, "contiguous"):
        inner = node.args[0]
        if only_user(inner) is not node:
            return f"{inner.name} has users besides {node.name}"
        node = inner
    if not (is_op(node, "transpose") and len(node.args) == 3 and {node.args[1], node.args[2]} == {0, 1}):
        return f"{getattr(node, 'name', node)} is not a [heads, tokens, D] -> [tokens, heads, D] transpose"
    squeezed = node.args[0]
    if not (is_op(squeezed, "squeeze") and arg(squeezed, 1, "dim") == 0) or only_user(squeezed) is not node:
        return f"{getattr(squeezed, 'name', squeezed)} is not a squeeze(0) used only by {node.name}"
    x = squeezed.args[0]
    if only_user(x) is not squeezed:
        return f"{x.name} has users besides the attention op"
    return x


def _mul_operands(node) -> tuple | None:
    """(a, b) and (b, a) of ``a * b`` with two tensor operands."""
    if not (is_op(node, "mul") and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)):
        return None
    a, b = node.args
    return (a, b), (b, a)


def _unsqueezed_1(node) -> fx.Node | None:
    """``t`` of ``t.unsqueeze(1)`` with ``t`` [1, num_tokens, head_dim]."""
    if not (is_op(node, "unsqueeze") and arg(node, 1, "dim") == 1):
        return None
    t = fake(node.args[0])
    return node.args[0] if t is not None and t.dim() == 3 and same_size(t.shape[0], 1) else None


def _last_dim_slice(node, x: fx.Node, dims: int) -> tuple | None:
    """(start, stop) of ``x[..., start:stop]`` (or ``x[:, :, :, start:stop]``), else None."""
    if not (is_op(node, "getitem") and node.args[0] is x and isinstance(node.args[1], tuple)):
        return None
    index = node.args[1]
    if len(index) == 2 and index[0] is Ellipsis:
        last = index[1]
    elif len(index) == dims and all(i == slice(None) for i in index[:-1]):
        last = index[-1]
    else:
        return None
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    return last.start, last.stop


def _is_rotate_half(node, x: fx.Node, head_dim: int) -> bool:
    """``cat((-x[..., D/2:], x[..., :D/2]), dim=-1)``."""
    if not is_op(node, "cat"):
        return False
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, list | tuple) or len(tensors) != 2 or dim not in (-1, 3):
        return False
    negated, first_half = tensors
    if not is_op(negated, "neg") or len(negated.args) != 1:
        return False
    half = head_dim // 2
    return (_last_dim_slice(negated.args[0], x, 4) in ((half, None), (half, head_dim))
            and _last_dim_slice(first_half, x, 4) in ((None, half), (0, half)))


def match_rope(node) -> tuple[fx.Node, fx.Node, fx.Node] | str:
    """(x, cos, sin) when ``node`` is HF's ``x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)``, with x
    [1, heads, num_tokens, head_dim] and cos/sin [1, num_tokens, head_dim]; else the reason it is not."""
    name = getattr(node, "name", node)
    if not (is_op(node, "add") and len(node.args) == 2 and not node.kwargs):
        return f"{name} is not the add of HF's RoPE"
    for cos_term, sin_term in (node.args, node.args[::-1]):
        cos_products, sin_products = _mul_operands(cos_term), _mul_operands(sin_term)
        if cos_products is None or sin_products is None:
            continue
        for x, cos_u in cos_products:
            x_val = fake(x)
            cos = _unsqueezed_1(cos_u)
            if x_val is None or x_val.dim() != 4 or cos is None or not isinstance(x_val.shape[-1], int):
                continue
            for rotated, sin_u in sin_products:
                sin = _unsqueezed_1(sin_u)
                if sin is not None and _is_rotate_half(rotated, x, x_val.shape[-1]):
                    return x, cos, sin
    return f"{name} is not x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1) (HF's apply_rotary_pos_emb)"


def _check_site(q, k, q_embed, k_embed, value, cos, sin, k_cache) -> str | None:
    vals = [fake(n) for n in (q, k, q_embed, k_embed, value, k_cache)]
    if any(v is None for v in vals):
        return "operands without fake values"
    q_val, k_val, q_embed_val, k_embed_val, v_val, cache_val = vals
    if len({v.dtype for v in vals}) != 1 or q_val.dtype not in _DTYPES:
        return (f"dtypes differ or are not fp32/fp16/bf16 (q {q_val.dtype}, k {k_val.dtype}, RoPE results "
                f"{q_embed_val.dtype}/{k_embed_val.dtype}, v {v_val.dtype}, cache {cache_val.dtype})")
    if not (same_shape(q_val, q_embed_val) and same_shape(k_val, k_embed_val)):
        return "RoPE changes the shape of q or k (cos/sin broadcast them)"
    head_dim = q_val.shape[-1]
    if head_dim % 2:
        return f"head_dim {head_dim} is odd"
    if not (same_size(q_val.shape[0], 1) and same_size(k_val.shape[0], 1) and same_size(k_val.shape[2], q_val.shape[2])
            and same_size(k_val.shape[3], head_dim)):
        return "q/k are not [1, heads, num_tokens, head_dim] of the same tokens and head_dim"
    for what, t in (("cos", fake(cos)), ("sin", fake(sin))):
        if t is None or t.dtype not in _DTYPES or not (same_size(t.shape[1], q_val.shape[2])
                                                      and same_size(t.shape[2], head_dim)):
            return f"{what} is not [1, num_tokens, head_dim] in fp32/fp16/bf16"
    return None


def _defined_in_order(inputs: list[fx.Node], write: fx.Node, attn: fx.Node) -> bool:
    """True when every node of ``inputs`` comes before ``write`` and ``write`` before ``attn`` (the fused op takes
    the write's place and feeds ``attn``)."""
    pending = set(inputs)
    for node in write.graph.nodes:
        if node is write:
            break
        pending.discard(node)
    else:
        return False
    node = write
    while node is not attn and node.op != "output":
        node = node.next
    return not pending and node is attn


def _match(write: fx.Node) -> tuple | str:
    """The site of one ``kv_cache_write``: (attention node, q, k, cos, sin), or why it is not one."""
    k_tok, v_tok, k_cache, v_cache, slot_mapping = write.args
    attn = [u for u in k_cache.users if u.target is torch.ops.cinfer.paged_attention.default
            and u.args[1] is k_cache and u.args[2] is v_cache]
    if len(attn) != 1:
        return f"{len(attn)} paged_attention ops read the caches {k_cache.name}/{v_cache.name}"
    attn = attn[0]
    q_embed, k_embed = _untokens_major(attn.args[0]), _untokens_major(k_tok)
    for what, embed in (("query", q_embed), ("key", k_embed)):
        if isinstance(embed, str):
            return f"{what}: {embed}"
    q_match, k_match = match_rope(q_embed), match_rope(k_embed)
    for what, match in (("query", q_match), ("key", k_match)):
        if isinstance(match, str):
            return f"{what}: {match}"
    (q, q_cos, q_sin), (k, k_cos, k_sin) = q_match, k_match
    if q_cos is not k_cos or q_sin is not k_sin:
        return "query and key are rotated with different cos/sin"
    reason = _check_site(q, k, q_embed, k_embed, v_tok, q_cos, q_sin, k_cache)
    if reason is None and not _defined_in_order([q, k, v_tok, q_cos, q_sin], write, attn):
        reason = "the cache write does not come after q, k, v, cos and sin and before paged_attention"
    return reason or (attn, q, k, q_cos, q_sin)


def fuse_rope_kv_cache_write(gm: fx.GraphModule, rejected: list[str] | None = None) -> int:
    """Fuse each layer's q/k RoPE and ``kv_cache_write`` into one ``cinfer.rope_kv_cache_write`` (see the module
    docstring); returns the number of layers fused. Layers that do not match are described in ``rejected`` and left
    as they are. Run after the attention pass (no ``kv_cache_write`` in the graph: nothing to do)."""
    rejected = [] if rejected is None else rejected
    graph = gm.graph
    count = 0
    for write in list(graph.nodes):
        if write.target is not torch.ops.cinfer.kv_cache_write.default:
            continue
        site = _match(write)
        if isinstance(site, str):
            rejected.append(f"{write.name}: {site}")
            logger.debug("rope: %s not fused: %s", write.name, site)
            continue
        attn, q, k, cos, sin = site
        _, v_tok, k_cache, v_cache, slot_mapping = write.args
        with graph.inserting_before(write):
            new_nodes = []
            for x in (q, k):
                squeezed = graph.call_method("squeeze", (x, 0))
                new_nodes += [squeezed, graph.call_method("transpose", (squeezed, 0, 1))]
            q_tok, k_tok = new_nodes[1], new_nodes[3]
            cos_tok, sin_tok = graph.call_method("squeeze", (cos, 0)), graph.call_method("squeeze", (sin, 0))
            fused = graph.call_function(torch.ops.cinfer.rope_kv_cache_write.default,
                                        (q_tok, k_tok, v_tok, cos_tok, sin_tok, k_cache, v_cache, slot_mapping))
            new_nodes += [cos_tok, sin_tok, fused]
        for node in new_nodes:
            node.meta.update({key: value for key, value in write.meta.items() if key in _COPIED_META})
            set_fake(node)
        attn.replace_input_with(attn.args[0], fused)
        graph.erase_node(write)
        count += 1
    if count:
        graph.eliminate_dead_code()
    finish_pass(gm, count > 0)
    return count
