"""``cinfer::kv_cache_write``: scatter this step's keys and values into the paged caches.

Cache layout (see DESIGN.md): ``k_cache``/``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``;
slot ``s`` is ``cache[s // block_size, s % block_size]``. Token ``t`` goes to ``slot_mapping[t]``; slot ``-1``
(CUDA-graph padding) is skipped, so nothing else in the cache is touched. Slots must be unique and in range
(the runtime's block manager guarantees both; the Triton kernel cannot check them without a host sync).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from cinfer_ops.launch import launch

# Largest slice of a token's [kv_heads * head_dim] row one program moves; wider rows get more programs (grid axis 1).
MAX_BLOCK = 4096
# From this many tokens on, the launcher takes its many-tokens kernel variant (see kv_cache_write_launch_params).
# The runtime's warm-up runs a step this large so that both variants compile before serving.
MANY_TOKENS = 1024


def kv_cache_write_launch_params(row: int, num_tokens: int) -> tuple[int, int, int]:
    """Default (block, tokens_per_program, num_warps) for a token row of ``row = kv_heads * head_dim`` elements.

    A program moves tokens_per_program x block elements of K and of V; around 2K elements keeps each thread on
    16-byte vectors while leaving enough programs to fill the card. benchmarks/bench_ops.py --sweep measures
    the alternatives. Two regimes, so per row size two compiled variants: below MANY_TOKENS tokens and from it on.
    """
    block = min(triton.next_power_of_2(row), MAX_BLOCK)
    tokens_per_program = 1 if num_tokens < MANY_TOKENS else max(1, min(16, 2048 // block))
    num_warps = min(max(block * tokens_per_program // 256, 1), 8)
    return block, tokens_per_program, num_warps


def check_cache_write_args(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Shapes, layout, index dtype and device of a cache write (shared with ``rope_kv_cache_write``)."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key/value must both be [tokens, kv_heads, head_dim], got {tuple(key.shape)}, {tuple(value.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must both be [blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"cache [kv_heads, head_dim] {tuple(k_cache.shape[2:])} != key's {tuple(key.shape[1:])}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 [{key.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def kv_cache_write_reference(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Same arguments as ``kv_cache_write``; index_copy_ into flat [slots, kv_heads, head_dim] views of the caches."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, value[keep].to(v_cache.dtype))


# num_tokens follows the step: not specialised (Triton would compile a variant for 1 and for multiples of 16); it
# only masks whole tokens (and the few slot_mapping entries a program loads).
@triton.jit(do_not_specialize=["num_tokens"])
def _kv_cache_write_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_tokens,
    key_token_stride, key_head_stride, value_token_stride, value_head_stride,
    ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TOKENS: tl.constexpr,
):
    # Program (i, j) moves columns [j*BLOCK, (j+1)*BLOCK) of the [kv_heads * head_dim] rows of TOKENS tokens, for K
    # and V. A token's row is contiguous in the cache (ROW elements at slot * ROW); in key/value only head_dim is.
    tokens = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    slots = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src_offs = (offs // HEAD_DIM) * key_head_stride + offs % HEAD_DIM
    # Padding tokens (slot -1) and tokens past the end neither load nor store.
    mask = (slots >= 0)[:, None] & (offs < ROW)[None, :]
    dst = slots[:, None] * ROW + offs[None, :]
    k = tl.load(key_ptr + tokens[:, None] * key_token_stride + src_offs[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    src_offs = (offs // HEAD_DIM) * value_head_stride + offs % HEAD_DIM
    v = tl.load(value_ptr + tokens[:, None] * value_token_stride + src_offs[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def kv_cache_write_triton(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, *,
                          block: int | None = None, tokens_per_program: int | None = None,
                          num_warps: int | None = None) -> None:
    """Triton launcher of ``kv_cache_write`` (same arguments). key/value may be strided along tokens and heads (e.g.
    views of a fused QKV projection); only head_dim needs unit stride, else they are copied. block /
    tokens_per_program (powers of two) / num_warps override ``kv_cache_write_launch_params``."""
    check_cache_write_args(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    row = kv_heads * head_dim
    default_block, default_tokens, default_warps = kv_cache_write_launch_params(row, num_tokens)
    block = block or default_block
    tokens_per_program = tokens_per_program or default_tokens
    for name, v in (("block", block), ("tokens_per_program", tokens_per_program)):
        if v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    grid = (triton.cdiv(num_tokens, tokens_per_program), triton.cdiv(row, block))
    launch(_kv_cache_write_kernel, grid,
        key, value, k_cache, v_cache, slot_mapping, num_tokens,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        ROW=row, HEAD_DIM=head_dim, BLOCK=block, TOKENS=tokens_per_program, num_warps=num_warps or default_warps,
    )


@torch.library.custom_op("cinfer::kv_cache_write", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def kv_cache_write(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """key/value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    (contiguous); slot_mapping: int64 [num_tokens], -1 = skip. Writes the caches in place, nothing else."""
    check_cache_write_args(key, value, k_cache, v_cache, slot_mapping)
    kv_cache_write_reference(key, value, k_cache, v_cache, slot_mapping)


@kv_cache_write.register_kernel("cuda")
def _(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    kv_cache_write_triton(key, value, k_cache, v_cache, slot_mapping)


@kv_cache_write.register_fake
def _(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    return None
