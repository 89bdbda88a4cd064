"""``cinfer::rope_kv_cache_write``: HF's rotary embedding of q and k, fused with the paged-cache write of k and v.

Per layer HF computes ``q_embed = q * cos + rotate_half(q) * sin`` (and the same for k), where
``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``; the attention pass then writes k_embed and v to the caches
(``cinfer.kv_cache_write``) and hands q_embed to ``cinfer.paged_attention``. Compiled, that is three small kernels
per layer (Inductor's q and k RoPE, the cache write), each latency-bound at decode. This op is one kernel:

    out       = rope(query)                                  # new, contiguous [num_tokens, num_heads, head_dim]
    k_cache[slot_mapping[t]] = rope(key)[t], v_cache[...] = value[t]   for every t with slot_mapping[t] >= 0

with ``rope(x) = x * cos + rotate_half(x) * sin``, cos/sin broadcast over heads. It is computed in fp32 and rounded
once to the dtype (as Inductor compiles HF's formula; HF eager in half precision rounds each product and the sum).
cos/sin are inputs, as HF's rotary module computes them per token, so RoPE scaling variants (llama3, linear,
dynamic, yarn's attention factor) need nothing here. Cache layout and slot rules as ``kv_cache_write``.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from cinfer_ops.kv_cache_write import check_cache_write_args, kv_cache_write_reference
from cinfer_ops.launch import launch
from cinfer_ops.pdl import pdl_launch_options, pdl_start

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rope_kv_cache_write_launch_params(num_heads: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """Default (heads_per_program, num_warps).

    A program rotates ``heads_per_program`` heads of one token (query heads, or key heads plus the matching value
    heads). Around 2K elements a program keeps each thread on 16-byte vectors; at decode (a few tokens) that leaves
    a handful of programs, which is what a latency-bound kernel wants. Not yet swept on a GPU.
    """
    half = triton.next_power_of_2(head_dim // 2)
    heads = min(triton.next_power_of_2(max(num_heads, kv_heads)), max(1, 1024 // half))
    return heads, min(max(heads * half * 2 // 512, 1), 8)


def _check(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
           slot_mapping: Tensor) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key/value must both be [num_tokens, kv_heads, head_dim], got {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    num_tokens, _, head_dim = query.shape
    if key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(f"key/value {tuple(key.shape)} must have query's {num_tokens} tokens and head_dim "
                         f"{head_dim} (query {tuple(query.shape)})")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotate_half splits it in two halves), got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        rows = t[0] if t.dim() == 3 and t.shape[0] == 1 else t
        if rows.shape != (num_tokens, head_dim):
            raise ValueError(f"{name} must be [num_tokens, head_dim] = [{num_tokens}, {head_dim}] (or [1, num_tokens, "
                             f"head_dim]), got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    check_cache_write_args(key, value, k_cache, v_cache, slot_mapping)
    dtypes = {t.dtype for t in (query, key, value, k_cache, v_cache)}
    if len(dtypes) != 1 or query.dtype not in DTYPES:
        raise ValueError(f"query, key, value and the caches must share one dtype (float32, float16 or bfloat16), got "
                         f"{query.dtype}, {key.dtype}, {value.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    devices = {t.device for t in (query, key, value, cos, sin, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _token_rows(t: Tensor) -> Tensor:
    """cos/sin as [num_tokens, head_dim] (a [1, num_tokens, head_dim] view loses its leading 1)."""
    return t[0] if t.dim() == 3 else t


def rotate_half(x: Tensor) -> Tensor:
    """HF's ``rotate_half``: ``cat(-x[..., D/2:], x[..., :D/2])``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` in fp32, rounded once to x.dtype. x: [num_tokens, heads, head_dim],
    cos/sin: [num_tokens, head_dim] (broadcast over heads). Returns a new contiguous tensor."""
    xf = x.float()
    cos, sin = _token_rows(cos).float()[:, None, :], _token_rows(sin).float()[:, None, :]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype).contiguous()


def rope_kv_cache_write_reference(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor,
                                  k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> Tensor:
    """Same arguments as ``rope_kv_cache_write``: HF's formula in torch, then index_copy_ into the caches."""
    kv_cache_write_reference(rope_reference(key, cos, sin), value, k_cache, v_cache, slot_mapping)
    return rope_reference(query, cos, sin)


@triton.jit
def _rope_kv_cache_write_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, out_ptr,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride,
    cos_token_stride, sin_token_stride,
    NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, HEADS: tl.constexpr, Q_PROGRAMS: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    # Program (t, j) handles token t: for j < Q_PROGRAMS query heads [j*HEADS, (j+1)*HEADS) into out, else key/value
    # heads [(j-Q_PROGRAMS)*HEADS, ...) into the caches. Each head is read as its two halves x1 = x[:HALF] and
    # x2 = x[HALF:], so rotate_half is a sign and a swap: out1 = x1*cos1 - x2*sin1, out2 = x2*cos2 + x1*sin2.
    token = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < HALF
    cos1 = tl.load(cos_ptr + token * cos_token_stride + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + token * cos_token_stride + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + token * sin_token_stride + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + token * sin_token_stride + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if j < Q_PROGRAMS:
        heads = j * HEADS + tl.arange(0, HEADS)
        mask = (heads < NUM_HEADS)[:, None] & d_mask[None, :]
        src = q_ptr + token * q_token_stride + heads[:, None] * q_head_stride + offs_d[None, :]
        x1 = tl.load(src, mask=mask).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask).to(tl.float32)
        dst = out_ptr + token * (NUM_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(dst, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        slot = tl.load(slot_mapping_ptr + token)
        heads = (j - Q_PROGRAMS) * HEADS + tl.arange(0, HEADS)
        # Padding tokens (slot -1) neither load nor store: they have no key/value heads.
        written_heads = tl.where(slot >= 0, KV_HEADS, 0)
        mask = (heads < written_heads)[:, None] & d_mask[None, :]
        dst_offs = slot * (KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + offs_d[None, :]
        src = k_ptr + token * k_token_stride + heads[:, None] * k_head_stride + offs_d[None, :]
        x1 = tl.load(src, mask=mask).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask).to(tl.float32)
        tl.store(k_cache_ptr + dst_offs, (x1 * cos1 - x2 * sin1).to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + dst_offs + HALF, (x2 * cos2 + x1 * sin2).to(k_cache_ptr.dtype.element_ty), mask=mask)
        src = v_ptr + token * v_token_stride + heads[:, None] * v_head_stride + offs_d[None, :]
        tl.store(v_cache_ptr + dst_offs, tl.load(src, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst_offs + HALF, tl.load(src + HALF, mask=mask), mask=mask)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_kv_cache_write_triton(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                               v_cache: Tensor, slot_mapping: Tensor, *, heads_per_program: int | None = None,
                               num_warps: int | None = None) -> Tensor:
    """Triton launcher of ``rope_kv_cache_write`` (same arguments and result). query/key/value may be strided along
    tokens and heads (views of a fused QKV projection), cos/sin along tokens; only the last dim needs unit stride,
    else it is copied. heads_per_program (a power of two) / num_warps override
    ``rope_kv_cache_write_launch_params``."""
    _check(query, key, value, cos, sin, k_cache, v_cache, slot_mapping)
    num_tokens, num_heads, head_dim = query.shape
    kv_heads = key.shape[1]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    query, key, value = _unit_last_stride(query), _unit_last_stride(key), _unit_last_stride(value)
    cos, sin = _unit_last_stride(_token_rows(cos)), _unit_last_stride(_token_rows(sin))
    default_heads, default_warps = rope_kv_cache_write_launch_params(num_heads, kv_heads, head_dim)
    heads = heads_per_program or default_heads
    if heads & (heads - 1):
        raise ValueError(f"heads_per_program must be a power of two, got {heads}")
    q_programs = triton.cdiv(num_heads, heads)
    grid = (num_tokens, q_programs + triton.cdiv(kv_heads, heads))
    launch(_rope_kv_cache_write_kernel, grid,
        query, key, value, cos, sin, k_cache, v_cache, slot_mapping, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), sin.stride(0),
        NUM_HEADS=num_heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), HEADS=heads, Q_PROGRAMS=q_programs,
        num_warps=num_warps or default_warps, **pdl_launch_options(query.device),
    )
    return out


@torch.library.custom_op("cinfer::rope_kv_cache_write", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def rope_kv_cache_write(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                        v_cache: Tensor, slot_mapping: Tensor) -> Tensor:
    """query: [num_tokens, num_heads, head_dim]; key/value: [num_tokens, num_kv_heads, head_dim] (any token/head
    strides); cos/sin: [num_tokens, head_dim] or [1, num_tokens, head_dim]; caches: [num_blocks, block_size,
    num_kv_heads, head_dim] (contiguous); slot_mapping: int64 [num_tokens], -1 = skip. q/k/v and the caches share
    one dtype (fp32/fp16/bf16); cos/sin may be fp32 or that dtype.

    Writes ``rope(key)`` and ``value`` to the caches in place and returns ``rope(query)``, a new contiguous
    [num_tokens, num_heads, head_dim] tensor; ``rope(x) = x * cos + rotate_half(x) * sin`` in fp32, rounded once."""
    _check(query, key, value, cos, sin, k_cache, v_cache, slot_mapping)
    return rope_kv_cache_write_reference(query, key, value, cos, sin, k_cache, v_cache, slot_mapping)


@rope_kv_cache_write.register_kernel("cuda")
def _(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
      slot_mapping: Tensor) -> Tensor:
    return rope_kv_cache_write_triton(query, key, value, cos, sin, k_cache, v_cache, slot_mapping)


@rope_kv_cache_write.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
      slot_mapping: Tensor) -> Tensor:
    return query.new_empty(query.shape)
