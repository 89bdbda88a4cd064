"""``cinfer::rope_paged_attention``: ``rope_kv_cache_write`` and ``paged_attention`` of one layer as one op.

    out = paged_attention(rope_kv_cache_write(query, key, value, cos, sin, k_cache, v_cache, slot_mapping),
                          k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)

At decode the two are latency-bound kernels in a row: at batch 1 on Llama-3-8B the RoPE/cache-write kernel held
61 µs of a 4.25 ms step on the critical path (H200, RESULTS.md run BT). Here a decode step is one kernel, the
split-KV decode kernel of ``paged_attention`` with the RoPE folded in:

- each program rotates the query rows it attends with (its kv head's query heads; q is never written back);
- the program whose split holds the token's last context position, ``seq_lens - 1``, rotates the token's key,
  writes it and the value to ``slot_mapping``'s slot, and scores them from registers instead of reading that slot.

A decode step is ``num_tokens == batch``, and the kernel relies on what the runtime's decode steps are:

- **at most one query token per sequence** (the padding sequences of a CUDA graph have none). The runtime never
  gives a prefill step as many sequences as tokens (``cinfer_runtime.cuda_graphs.StepGraphs.prefill_batch``,
  ``graph_passes.paged_model``'s padding);
- **a token's slot is its own context position** ``seq_lens - 1`` in its block table, which no other token of the
  step sees (the separate ops would read the cache there after writing it; this kernel scores its registers).

A token with slot ``-1`` writes nothing and reads that position from the cache, as ``paged_attention`` does. Other
steps (prefill, chunked prefill, mixed) run the two ops' kernels, which assume nothing.

Arguments are those of the two ops (layouts, dtypes and rules as there), and the result is ``paged_attention``'s.
"""
import torch
from torch import Tensor

from cinfer_ops.paged_attention import _check as _check_attention
from cinfer_ops.paged_attention import paged_attention_reference, paged_attention_triton
from cinfer_ops.rope_kv_cache_write import _check as _check_rope
from cinfer_ops.rope_kv_cache_write import _token_rows, _unit_last_stride
from cinfer_ops.rope_kv_cache_write import rope_kv_cache_write_reference, rope_kv_cache_write_triton


def _check(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
           slot_mapping: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor) -> None:
    _check_rope(query, key, value, cos, sin, k_cache, v_cache, slot_mapping)
    _check_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)


def rope_paged_attention_reference(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor,
                                   k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, block_tables: Tensor,
                                   seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    """The two ops' references in a row (writes the caches, returns the attention output)."""
    q_rot = rope_kv_cache_write_reference(query, key, value, cos, sin, k_cache, v_cache, slot_mapping)
    return paged_attention_reference(q_rot, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def rope_paged_attention_triton(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor,
                                k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, block_tables: Tensor,
                                seq_lens: Tensor, query_start_loc: Tensor, scale: float, *,
                                decode_config=None, prefill_config=None) -> Tensor:
    """The Triton implementation: one decode kernel when ``num_tokens == batch``, else the two ops' kernels.
    ``decode_config``/``prefill_config`` as for ``paged_attention_triton``."""
    _check(query, key, value, cos, sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc)
    if query.shape[0] == block_tables.shape[0]:
        rope = (*map(_unit_last_stride, (key, value, _token_rows(cos), _token_rows(sin))), slot_mapping)
        return paged_attention_triton(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                      decode_config=decode_config, rope=rope)
    q_rot = rope_kv_cache_write_triton(query, key, value, cos, sin, k_cache, v_cache, slot_mapping)
    return paged_attention_triton(q_rot, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                  prefill_config=prefill_config, decode_config=decode_config)


@torch.library.custom_op("cinfer::rope_paged_attention", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def rope_paged_attention(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                         v_cache: Tensor, slot_mapping: Tensor, block_tables: Tensor, seq_lens: Tensor,
                         query_start_loc: Tensor, scale: float) -> Tensor:
    """query [num_tokens, num_heads, head_dim], key/value [num_tokens, num_kv_heads, head_dim] (any token/head
    strides), cos/sin [num_tokens, head_dim] or [1, num_tokens, head_dim]; the rest as ``paged_attention`` and
    ``rope_kv_cache_write``. Writes rope(key) and value to the caches; returns the attention output
    [num_tokens, num_heads, head_dim] (rows past query_start_loc[-1] unspecified)."""
    _check(query, key, value, cos, sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc)
    return rope_paged_attention_reference(query, key, value, cos, sin, k_cache, v_cache, slot_mapping, block_tables,
                                          seq_lens, query_start_loc, scale)


@rope_paged_attention.register_kernel("cuda")
def _(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
      slot_mapping: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    return rope_paged_attention_triton(query, key, value, cos, sin, k_cache, v_cache, slot_mapping, block_tables,
                                       seq_lens, query_start_loc, scale)


@rope_paged_attention.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
      slot_mapping: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    return query.new_empty(query.shape)
