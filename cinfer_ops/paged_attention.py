"""``cinfer::paged_attention``: causal attention of each sequence's new queries over its paged K/V context.

Layout (DESIGN.md): query/output ``[num_tokens, num_heads, head_dim]``, caches
``[num_blocks, block_size, num_kv_heads, head_dim]``, ``block_tables`` int32 ``[batch, max_blocks_per_seq]``,
``seq_lens`` int32 ``[batch]`` (context length including this step's tokens), ``query_start_loc`` int32
``[batch + 1]``. Query ``i`` of sequence ``b`` sees context positions ``j <= seq_lens[b] - q_len[b] + i``.
Nothing past a sequence's context (slots, block-table entries) is ever read.
"""
import torch
from torch import Tensor


def _check(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
           query_start_loc: Tensor) -> None:
    assert query.dim() == 3, f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, f"caches must be [blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)}"
    num_heads, head_dim = query.shape[1:]
    kv_heads = k_cache.shape[2]
    assert k_cache.shape[3] == head_dim, f"cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}"
    assert num_heads % kv_heads == 0, f"num_heads {num_heads} not a multiple of num_kv_heads {kv_heads}"
    assert block_tables.dim() == 2 and block_tables.dtype == torch.int32, "block_tables must be int32 [batch, max_blocks_per_seq]"
    batch = block_tables.shape[0]
    assert seq_lens.shape == (batch,) and seq_lens.dtype == torch.int32, "seq_lens must be int32 [batch]"
    assert query_start_loc.shape == (batch + 1,) and query_start_loc.dtype == torch.int32, "query_start_loc must be int32 [batch + 1]"


def paged_attention_reference(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                              seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    """Per-sequence dense attention over gathered pages, computed in fp32 (GQA by grouping, never copying K/V)."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for b, ctx in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        blocks = block_tables[b, : (ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:ctx].float()
        v = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:ctx].float()
        q = query[start:end].float().view(q_len, kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", q, k) * scale
        last_visible = ctx - q_len + torch.arange(q_len)
        visible = torch.arange(ctx)[None, :] <= last_visible[:, None]
        scores.masked_fill_(~visible, float("-inf"))
        o = torch.einsum("hgqk,khd->qhgd", scores.softmax(-1), v)
        out[start:end] = o.reshape(q_len, num_heads, head_dim).to(query.dtype)
    return out


def paged_attention_triton(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    raise NotImplementedError("Triton paged attention is being written")


@torch.library.custom_op("cinfer::paged_attention", mutates_args=(), device_types="cpu")
def paged_attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float) -> Tensor:
    """Returns [num_tokens, num_heads, head_dim] in query.dtype; rows past query_start_loc[-1] are unspecified."""
    _check(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    return paged_attention_reference(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


@paged_attention.register_kernel("cuda")
def _(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
      query_start_loc: Tensor, scale: float) -> Tensor:
    return paged_attention_triton(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


@paged_attention.register_fake
def _(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
      query_start_loc: Tensor, scale: float) -> Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)
