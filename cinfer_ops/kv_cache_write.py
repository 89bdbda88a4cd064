"""``cinfer::kv_cache_write``: scatter this step's keys and values into the paged caches.

Cache layout (see DESIGN.md): ``k_cache``/``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``;
slot ``s`` is ``cache[s // block_size, s % block_size]``. Token ``t`` goes to ``slot_mapping[t]``; slot ``-1``
(CUDA-graph padding) is skipped, so nothing else in the cache is touched.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor


def _check(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    assert key.dim() == 3 and key.shape == value.shape, f"key/value must be [tokens, kv_heads, head_dim], got {tuple(key.shape)}, {tuple(value.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, f"caches must be [blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)}"
    assert k_cache.shape[2:] == key.shape[1:], f"cache heads/head_dim {tuple(k_cache.shape[2:])} != key {tuple(key.shape[1:])}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert slot_mapping.shape == (key.shape[0],), f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}"


def kv_cache_write_reference(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, value[keep].to(v_cache.dtype))


@triton.jit
def _kv_cache_write_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    key_token_stride, key_head_stride, value_token_stride, value_head_stride,
    ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per token moves its whole [kv_heads, head_dim] row of K and of V (contiguous in the cache).
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    k = tl.load(key_ptr + token * key_token_stride + head * key_head_stride + dim, mask=mask)
    v = tl.load(value_ptr + token * value_token_stride + head * value_head_stride + dim, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def kv_cache_write_triton(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    _check(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    # head_dim must be unit-stride; tokens and heads may be strided (e.g. views of a fused QKV projection).
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    row = kv_heads * head_dim
    block = triton.next_power_of_2(row)
    _kv_cache_write_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        ROW=row, HEAD_DIM=head_dim, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
    )


@torch.library.custom_op("cinfer::kv_cache_write", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def kv_cache_write(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """key/value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
    slot_mapping: int64 [num_tokens], -1 = skip. Writes the caches in place."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    kv_cache_write_reference(key, value, k_cache, v_cache, slot_mapping)


@kv_cache_write.register_kernel("cuda")
def _(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    kv_cache_write_triton(key, value, k_cache, v_cache, slot_mapping)


@kv_cache_write.register_fake
def _(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    return None
