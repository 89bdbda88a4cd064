"""RoPE + attention pass: per layer, ``cinfer.rope_kv_cache_write`` feeding ``cinfer.paged_attention`` -> one
``cinfer.rope_paged_attention``.

After the RoPE pass each layer of a paged graph reads

    q_rot = rope_kv_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    o = paged_attention(q_rot, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)

which becomes

    o = rope_paged_attention(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                             query_start_loc, scale)

the same computation by definition (see ``cinfer_ops.rope_paged_attention``): at decode one kernel instead of two
latency-bound ones in a row. The fused node takes the attention node's place (and its meta: the same value, a new
contiguous [num_tokens, num_heads, head_dim]), so the cache write moves down to it.

It fires only where that is exact: ``q_rot`` is the attention's query and read by nothing else (the fused op never
returns it), the attention reads the caches the RoPE op writes, and no node between the two reads or writes either
cache (or a view of one), since the write now happens later. Anything else is left as it was and the reason logged:
like the RoPE pass, this is an optimisation. Runs last, on a paged graph (no ``rope_kv_cache_write``: nothing to do).
"""
import logging

import torch
from torch import fx

from graph_passes.fx_utils import arg, finish_pass

logger = logging.getLogger(__name__)

# False: fuse_rope_attention rewrites nothing (RoPE/cache write and attention stay two ops); read when a graph is
# compiled.
ROPE_ATTENTION = True

_ROPE_ARGS = ("query", "key", "value", "cos", "sin", "k_cache", "v_cache", "slot_mapping")
_ATTENTION_ARGS = ("query", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc", "scale")


def _cache_readers_between(rope: fx.Node, attn: fx.Node, caches: tuple[fx.Node, fx.Node]) -> list[fx.Node]:
    """Nodes strictly between ``rope`` and ``attn`` that read a cache or anything derived from one (a view may
    alias it), other than those two nodes."""
    derived, stack = set(), list(caches)
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in derived and user is not rope and user is not attn:
                derived.add(user)
                stack.append(user)
    between, node = [], rope.next
    while node is not attn and node.op != "root":
        if node in derived:
            between.append(node)
        node = node.next
    return between


def _match(rope: fx.Node) -> tuple | str:
    """(attention node, the rope op's arguments, the attention's) of one site, or why ``rope`` is not one."""
    rope_args = [arg(rope, i, name) for i, name in enumerate(_ROPE_ARGS)]
    users = list(rope.users)
    if len(users) != 1:
        return f"its result has {len(users)} users, not only paged_attention"
    attn = users[0]
    if attn.target is not torch.ops.cinfer.paged_attention.default:
        return f"its only user {attn.name} is not paged_attention"
    attn_args = [arg(attn, i, name) for i, name in enumerate(_ATTENTION_ARGS)]
    if attn_args[0] is not rope or any(a is rope for a in attn_args[1:]):
        return f"{attn.name} does not read it as its query (only)"
    k_cache, v_cache = rope_args[5], rope_args[6]
    if attn_args[1] is not k_cache or attn_args[2] is not v_cache:
        return (f"{attn.name} reads other caches ({getattr(attn_args[1], 'name', attn_args[1])}/"
                f"{getattr(attn_args[2], 'name', attn_args[2])}) than it writes ({k_cache.name}/{v_cache.name})")
    between = _cache_readers_between(rope, attn, (k_cache, v_cache))
    if between:
        return (f"{', '.join(n.name for n in between)} between it and {attn.name} use the caches: the write "
                f"cannot move down to the attention")
    return attn, rope_args, attn_args


def fuse_rope_attention(gm: fx.GraphModule, rejected: list[str] | None = None) -> int:
    """Fuse each ``rope_kv_cache_write`` used only as its layer's ``paged_attention`` query into one
    ``cinfer.rope_paged_attention`` (see the module docstring); returns how many. Sites that do not match are
    described in ``rejected`` and left as they are."""
    rejected = [] if rejected is None else rejected
    if not ROPE_ATTENTION:
        return 0
    graph = gm.graph
    count = 0
    for rope in [n for n in graph.nodes if n.target is torch.ops.cinfer.rope_kv_cache_write.default]:
        site = _match(rope)
        if isinstance(site, str):
            rejected.append(f"{rope.name}: {site}")
            logger.debug("rope_attention: %s not fused: %s", rope.name, site)
            continue
        attn, rope_args, attn_args = site
        # Every argument is defined before attn: the rope op's come before the rope op, which comes before attn.
        with graph.inserting_before(attn):
            fused = graph.call_function(torch.ops.cinfer.rope_paged_attention.default, (*rope_args, *attn_args[3:]))
        fused.meta.update(attn.meta)  # the same value (a deferred one stays deferred: computed from the fused op)
        attn.replace_all_uses_with(fused)
        graph.erase_node(attn)
        graph.erase_node(rope)
        count += 1
    finish_pass(gm, count > 0)
    return count
