"""``cinfer::linear``: ``F.linear`` whose few-row (decode) case runs a weight-streaming Triton kernel.

At decode every projection is a GEMV-shaped GEMM: ``M`` (the step's tokens, 1-16) rows against a weight of tens or
hundreds of MB, so the kernel's only job is to stream the weight at copy bandwidth. cuBLAS picks split-K kernels
for these shapes (plus a reduce kernel) and measured 76-89% of copy bandwidth on an H100 for the Llama-3-8B
projections. The kernel here gives each program ``BLOCK_N`` whole weight rows, streams them along K through a
``NUM_STAGES``-deep pipeline and multiplies with tensor cores against the ``M`` rows of ``x`` padded to ``BLOCK_M``
(the operands swapped: ``out^T = W @ x^T``, so the weight is the row-major A operand). There is no split-K and
no second kernel; each output element is one program's fp32 dot product, rounded once.

Larger ``M`` (prefill, big decode batches) is compute-bound or close to it and stays with cuBLAS: the op's CUDA
implementation chooses per call, from ``LINEAR_CONFIGS``, so the choice is made at CUDA-graph capture and costs
nothing at replay. The choice is per weight shape: a few-row GEMM against a weight that cuBLAS streams as fast
stays on cuBLAS.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# Rows of x up to which the streaming kernel can run (its tensor-core tile height).
MAX_STREAM_ROWS = 16


@dataclass(frozen=True)
class LinearConfig:
    block_n: int = 32       # weight rows per program
    block_k: int = 512      # K elements per pipeline stage
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1        # programs per row block along K (the last to finish reduces)


# When the op streams: x with at most STREAM_ROWS rows (0 turns the kernel off), with the config of the weight's
# (N, K) in LINEAR_CONFIGS, or DEFAULT_LINEAR_CONFIG for other shapes; a shape mapped to None stays on cuBLAS.
# Chosen by benchmarks/tune_linear.py on an H100 (see benchmarks/RESULTS.md).
STREAM_ROWS = MAX_STREAM_ROWS
DEFAULT_LINEAR_CONFIG = LinearConfig()
LINEAR_CONFIGS: dict[tuple[int, int], LinearConfig | None] = {}
_DTYPES = (torch.bfloat16, torch.float16)


def load_linear_configs(path: str) -> dict[tuple[int, int], LinearConfig | None]:
    """A ``linear_configs`` table as ``benchmarks/tune_linear.py`` writes it (JSON: "N,K" -> [block_n, block_k,
    num_warps, num_stages] or null), for ``LINEAR_CONFIGS``."""
    import json

    with open(path) as f:
        table = json.load(f)
    table = table.get("linear_configs", table)
    return {tuple(int(v) for v in key.split(",")): None if value is None else LinearConfig(*value)
            for key, value in table.items()}


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` in x's dtype: the CPU implementation and the large-M CUDA path."""
    return F.linear(x, weight, bias)


def pick_linear_config(rows: int, n: int, k: int) -> LinearConfig | None:
    """The streaming kernel's config for x of ``rows`` rows against weight [n, k], or None for cuBLAS."""
    if rows > min(STREAM_ROWS, MAX_STREAM_ROWS):
        return None
    return LINEAR_CONFIGS.get((n, k), DEFAULT_LINEAR_CONFIG)


@triton.jit
def _stream_linear_kernel(
    x_ptr, up_ptr, w_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, k_per_split,
    stride_xm, stride_um, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):
    # Program (p, s) multiplies weight rows [p*BLOCK_N, +BLOCK_N) over K range [s*k_per_split, +k_per_split)
    # (k_per_split a multiple of BLOCK_K) as W[rows] @ x^T; the K loop is software-pipelined num_stages deep (a
    # launch option). Weight rows past N and x rows past M load as zero and are never stored.
    # GATED: x is silu(x) * up, formed on the fly with HF's roundings (silu rounded to the dtype, then the product).
    # SPLIT_K > 1: each program stores its fp32 partial and bumps the row block's counter; the last of the SPLIT_K
    # to arrive sums the partials in split order (so the result does not depend on who is last), writes the
    # output and resets the counter to 0 for the next launch.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    k_start = split * k_per_split
    ks = k_start + tl.arange(0, BLOCK_K)
    n_ok = rows_n < N
    m_ok = rows_m < M
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + ks[None, :]        # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows_m.to(tl.int64)[None, :] * stride_xm + ks[:, None]        # [BLOCK_K, BLOCK_M]
    u_ptrs = up_ptr + rows_m.to(tl.int64)[None, :] * stride_um + ks[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
            if GATED:
                u = tl.load(u_ptrs, mask=m_ok[None, :], other=0.0)
        else:
            k_ok = (k0 - k_start + ks) < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
            if GATED:
                u = tl.load(u_ptrs, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        if GATED:
            xf = x.to(tl.float32)
            act = (xf / (1.0 + tl.exp(-xf))).to(x.dtype)
            x = (act.to(tl.float32) * u.to(tl.float32)).to(x.dtype)
            u_ptrs += BLOCK_K
        if UPCAST_DOT:  # Triton's interpreter multiplies bf16 dot operands as raw bits (triton 3.9)
            acc = tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        elif FP32_IEEE:  # fp32 operands: full fp32 products, as F.linear (no tf32)
            acc = tl.dot(w, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out_ptrs = out_ptr + rows_m.to(tl.int64)[None, :] * stride_om + rows_n[:, None]
    out_mask = n_ok[:, None] & m_ok[None, :]
    tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + rows_m[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        block_parts = part_ptr + pid_n.to(tl.int64) * (SPLIT_K * BLOCK_N * BLOCK_M)
        tl.store(block_parts + split * (BLOCK_N * BLOCK_M) + tile, acc)
        # The barrier orders every thread's partial stores before the (one-thread, release) increment; its
        # acquire side orders the last program's reads after everyone's stores.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(block_parts + s * (BLOCK_N * BLOCK_M) + tile, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)


class _SplitWorkspace:
    """Per device: fp32 partials and int32 arrival counters of split-K launches. The counters are zero between
    launches (the last program of each row block resets its own). Grown only outside CUDA-graph capture, so a
    captured launch keeps addresses that stay valid; launches on one device share it, which is safe because they
    run in stream order (one model step at a time)."""

    def __init__(self):
        self._buffers: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def get(self, device: torch.device, part_elems: int, counters: int) -> tuple[Tensor, Tensor] | None:
        parts, counts = self._buffers.get(device, (None, None))
        if parts is not None and parts.numel() >= part_elems and counts.numel() >= counters:
            return parts, counts
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # too small, and allocating now would tie the buffer to this graph: split-free launch
        parts = torch.empty(max(part_elems, 0 if parts is None else parts.numel()), dtype=torch.float32,
                            device=device)
        counts = torch.zeros(max(counters, 0 if counts is None else counts.numel()), dtype=torch.int32,
                             device=device)
        self._buffers[device] = (parts, counts)
        return parts, counts


_WORKSPACE = _SplitWorkspace()


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, up: Tensor | None = None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)}: last dim must equal weight's in_features {weight.shape[1]}")
    if up is not None and up.shape != x.shape:
        raise ValueError(f"up {tuple(up.shape)} must have gate's shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("up", up)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")


def _rows(t: Tensor, k: int) -> Tensor:
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def linear_stream_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, up: Tensor | None = None,
                         config: LinearConfig | None = None) -> Tensor:
    """The streaming kernel: ``F.linear(x, weight, bias)``, or with ``up`` given ``F.linear(silu(x) * up, weight,
    bias)``. x (and up): [..., K] with at most ``MAX_STREAM_ROWS`` rows (rows may be strided); weight [N, K]; bias
    [N] or None; one dtype of bf16/fp16/fp32. Returns a contiguous [..., N]."""
    _check(x, weight, bias, up)
    n, k = weight.shape
    x2 = _rows(x, k)
    u2 = _rows(up, k) if up is not None else x2
    m = x2.shape[0]
    if m > MAX_STREAM_ROWS:
        raise ValueError(f"the streaming kernel takes at most {MAX_STREAM_ROWS} rows, got {m}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if not (m and n):
        return out.view(*x.shape[:-1], n)
    config = config or DEFAULT_LINEAR_CONFIG
    grid_n = triton.cdiv(n, config.block_n)
    split_k = max(1, min(config.split_k, triton.cdiv(k, config.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty split
    parts = counts = out  # unused when split_k == 1
    if split_k > 1:
        workspace = _WORKSPACE.get(x.device, grid_n * split_k * config.block_n * MAX_STREAM_ROWS, grid_n)
        if workspace is None:
            split_k, k_per_split = 1, k
        else:
            parts, counts = workspace
    _stream_linear_kernel[(grid_n, split_k)](
        x2, u2, weight, bias if bias is not None else weight, out, parts, counts, m, n, k, k_per_split,
        x2.stride(0), u2.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, GATED=up is not None, BLOCK_M=MAX_STREAM_ROWS, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT_K=split_k, EVEN_K=k % config.block_k == 0,
        UPCAST_DOT=x.dtype == torch.bfloat16 and x.device.type != "cuda", FP32_IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out.view(*x.shape[:-1], n)


def _stream_config(x: Tensor, weight: Tensor) -> LinearConfig | None:
    """The config the CUDA implementation streams with, or None for cuBLAS."""
    if x.dtype not in _DTYPES or weight.dim() != 2 or weight.stride(-1) != 1:
        return None
    return pick_linear_config(x.numel() // max(x.shape[-1], 1), *weight.shape)


@torch.library.custom_op("cinfer::linear", mutates_args=(), device_types="cpu")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)``. x: [..., in_features]; weight: [out_features, in_features]; bias:
    [out_features] or None. Returns a contiguous [..., out_features] in x.dtype."""
    return linear_reference(x, weight, bias).contiguous()


@linear.register_kernel("cuda")
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    config = _stream_config(x, weight)
    if config is None:
        return linear_reference(x, weight, bias).contiguous()
    return linear_stream_triton(x, weight, bias, config=config)


@linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def silu_mul_linear_reference(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """HF's MLP tail ``down_proj(act_fn(gate) * up)`` with act_fn = SiLU, in the inputs' dtype."""
    return F.linear(F.silu(gate) * up, weight, bias)


@torch.library.custom_op("cinfer::silu_mul_linear", mutates_args=(), device_types="cpu")
def silu_mul_linear(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(F.silu(gate) * up, weight, bias)``. gate, up: [..., in_features] of one shape; weight:
    [out_features, in_features]; bias: [out_features] or None. Returns a contiguous [..., out_features]."""
    return silu_mul_linear_reference(gate, up, weight, bias).contiguous()


@silu_mul_linear.register_kernel("cuda")
def _(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    config = _stream_config(gate, weight)
    if config is None or up.shape != gate.shape:
        return silu_mul_linear_reference(gate, up, weight, bias).contiguous()
    return linear_stream_triton(gate, weight, bias, up=up, config=config)


@silu_mul_linear.register_fake
def _(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return gate.new_empty((*gate.shape[:-1], weight.shape[0]))
