"""``cinfer::linear``: ``F.linear`` whose few-row (decode) case runs a weight-streaming Triton kernel; and
``cinfer::linear_silu_mul``, a fused gate/up projection with the gated MLP's activation in that kernel's epilogue.

At decode every projection is a GEMV-shaped GEMM: ``M`` (the step's tokens, 1-16) rows against a weight of tens or
hundreds of MB, so the kernel's only job is to stream the weight at copy bandwidth. cuBLAS picks split-K kernels
for these shapes (plus a reduce kernel) and measured 76-89% of copy bandwidth on an H100 for the Llama-3-8B
projections. The kernel here gives each program ``BLOCK_N`` whole weight rows, streams them along K through a
``NUM_STAGES``-deep pipeline and multiplies with tensor cores against the ``M`` rows of ``x`` padded to ``BLOCK_M``
(the operands swapped: ``out^T = W @ x^T``, so the weight is the row-major A operand). There is no split-K and
no second kernel; each output element is one program's fp32 dot product, rounded once.

Larger ``M`` (prefill, big decode batches) is compute-bound or close to it and stays with cuBLAS: the op's CUDA
implementation chooses per call, from the GPU's config table, so the choice is made at CUDA-graph capture and costs
nothing at replay. The choice is per weight shape: a few-row GEMM against a weight that cuBLAS streams as fast
stays on cuBLAS.

``linear_silu_mul`` streams a [2 * I, K] weight (gate rows, then up rows) in the same K loop, with each program's
tile holding its columns' gate rows and up rows, and writes ``silu(gate) * up`` [M, I]: the layer's activation
kernel and the [M, 2 * I] projection's write and read are gone (``graph_passes.silu_mul_pass``).
"""
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from cinfer_ops.launch import launch, num_sms
from cinfer_ops.pdl import pdl_launch_dependents, pdl_launch_options, pdl_wait
from cinfer_ops.silu_mul import silu_mul_reference, silu_mul_triton

# Rows of x up to which the streaming kernel can run (its tensor-core tile height).
MAX_STREAM_ROWS = 16
# Columns per partial sum of squares in cinfer::linear_add_rms_stats' sumsq (every config's block_n is a multiple).
STATS_CHUNK = 16
_STATS_CHUNK = tl.constexpr(STATS_CHUNK)


@dataclass(frozen=True)
class LinearConfig:
    block_n: int = 64       # weight rows per program
    block_k: int = 256      # K elements per pipeline stage
    num_warps: int = 4
    num_stages: int = 4


# When the op streams: x with at most STREAM_ROWS rows (0 turns the kernel off), with the config of the weight's
# (N, K) in the GPU's table, or DEFAULT_LINEAR_CONFIG for other shapes; a shape mapped to None stays on cuBLAS.
# Chosen by benchmarks/tune_linear.py on each GPU (see benchmarks/RESULTS.md). The best config follows the card: on
# an H200, Llama-3-8B batch 1 ran 217 tok/s with the H100's table and 235 with its own (session 8).
STREAM_ROWS = MAX_STREAM_ROWS
DEFAULT_LINEAR_CONFIG = LinearConfig()  # the best single config over the 8B shapes (run J)
H100_LINEAR_CONFIGS: dict[tuple[int, int], LinearConfig | None] = {
    # Llama-3-8B: fused q/k/v, o_proj, fused gate/up, down_proj, lm_head
    (6144, 4096): LinearConfig(64, 128, 4, 5), (4096, 4096): LinearConfig(64, 256, 4, 4),
    (28672, 4096): LinearConfig(128, 128, 8, 4), (4096, 14336): LinearConfig(32, 512, 4, 3),
    (128256, 4096): LinearConfig(32, 512, 4, 4),
    # Llama-3.2-1B: the same five (cuBLAS was as fast for o_proj)
    (3072, 2048): LinearConfig(64, 128, 4, 5), (2048, 2048): None, (16384, 2048): LinearConfig(64, 128, 4, 4),
    (2048, 8192): LinearConfig(32, 512, 4, 4), (128256, 2048): LinearConfig(64, 256, 4, 4),
}
H200_LINEAR_CONFIGS: dict[tuple[int, int], LinearConfig | None] = {  # RESULTS.md, session 8
    (6144, 4096): LinearConfig(64, 256, 4, 4), (4096, 4096): LinearConfig(32, 512, 4, 4),
    (28672, 4096): LinearConfig(64, 128, 4, 4), (4096, 14336): LinearConfig(32, 512, 4, 4),
    (128256, 4096): LinearConfig(64, 128, 4, 3),
    (3072, 2048): LinearConfig(32, 512, 4, 4), (2048, 2048): LinearConfig(32, 512, 4, 4),
    (16384, 2048): LinearConfig(64, 128, 4, 3), (2048, 8192): None, (128256, 2048): LinearConfig(128, 128, 8, 3),
}
# Tables by GPU model: the first key found in torch.cuda.get_device_name(); any other GPU gets the H100's.
GPU_LINEAR_CONFIGS = {"H200": H200_LINEAR_CONFIGS, "H100": H100_LINEAR_CONFIGS}
# One table for every GPU instead (tune_linear.py's output through bench_generate --linear-configs, tests), or None.
LINEAR_CONFIGS: dict[tuple[int, int], LinearConfig | None] | None = None
_DTYPES = (torch.bfloat16, torch.float16)
# Whether a grid of at most one program per SM lets the next kernel launch (PDL) before its K loop rather than after
# it (see _early_from). Llama-3-8B batch 1 on an H100 (RESULTS.md run BZ): 177 tok/s against 174 without; the same
# for the last wave of any grid ran 160. CINFER_LINEAR_EARLY=0 turns it off.
EARLY_DEPENDENTS = os.environ.get("CINFER_LINEAR_EARLY", "1") != "0"


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


@functools.cache
def _gpu_table(name: str) -> dict[tuple[int, int], LinearConfig | None]:
    return next((table for model, table in GPU_LINEAR_CONFIGS.items() if model in name), H100_LINEAR_CONFIGS)


def linear_configs(device: torch.device | None = None) -> dict[tuple[int, int], LinearConfig | None]:
    """The config table for ``device``: ``LINEAR_CONFIGS`` if set, else its GPU model's (the H100's on CPU)."""
    if LINEAR_CONFIGS is not None:
        return LINEAR_CONFIGS
    if device is None or device.type != "cuda":
        return H100_LINEAR_CONFIGS
    return _gpu_table(torch.cuda.get_device_name(device))


def pick_linear_config(rows: int, n: int, k: int, device: torch.device | None = None) -> LinearConfig | None:
    """The streaming kernel's config for x of ``rows`` rows against weight [n, k] on ``device``, or None for
    cuBLAS."""
    if rows > min(STREAM_ROWS, MAX_STREAM_ROWS):
        return None
    return linear_configs(device).get((n, k), DEFAULT_LINEAR_CONFIG)


# One variant for every row count (1 and 16 would each get their own) and grid.
@triton.jit(do_not_specialize=["M", "early_from"])
def _stream_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, early_from,
    residual_ptr, norm_w_ptr, new_residual_ptr, sumsq_ptr, stride_rm, num_parts, eps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, FP32_IEEE: tl.constexpr, GATED: tl.constexpr,
    ADD_RMS_STATS: tl.constexpr, RMS_SCALE: tl.constexpr, PARTS_BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    # The K loop is software-pipelined num_stages deep (a launch option).
    # Program p computes out[:, p*BLOCK_N : (p+1)*BLOCK_N] as (W[rows] @ x^T)^T. Weight rows past N (the last
    # program) and x rows past M load as zero and are never stored.
    # GATED: the weight has 2N rows, gate rows [0, N) then up rows [N, 2N), and out[:, j] = silu(gate_j) * up_j.
    # Program p takes output columns [p*H, (p+1)*H), H = BLOCK_N // 2: its tile's first H rows are their gate
    # rows, the last H their up rows, so the K loop is the plain kernel's and only the epilogue differs.
    # ADD_RMS_STATS (cinfer::linear_add_rms_stats, not GATED): the epilogue adds the residual (new_residual = y +
    # residual, y rounded first), writes norm_weight * new_residual to out and each STATS_CHUNK columns' sum of
    # squares of new_residual to sumsq [M, num_parts].
    # RMS_SCALE (cinfer::rms_stats_linear): x is such a norm_weight * h; the accumulator is scaled by
    # rstd = rsqrt(sum(sumsq[m, :]) / K + eps) after the loop (1 where sumsq[m] is negative: x is normalized), so
    # the K loop is the plain kernel's.
    rows_m = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    m_ok = rows_m < M
    if GATED:
        HALF: tl.constexpr = BLOCK_N // 2
        tile = tl.arange(0, BLOCK_N)
        cols = tl.program_id(0) * HALF + tile % HALF  # the output column of each tile row
        n_ok = cols < N
        rows_n = cols + (tile // HALF) * N
    else:
        rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rows_n < N
    # PDL (cinfer_ops.pdl): programs from early_from on (_early_from) let the next kernel launch now, so that it
    # is resident on the SMs this grid leaves idle, waiting, when this one ends; the others after their loop.
    if tl.program_id(0) >= early_from:
        pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)  # x comes from the previous kernel
    if RMS_SCALE:
        # Loaded before the loop, so its latency hides behind the weight stream, and reduced after it: reduced
        # here, every warp would wait for it before issuing its first weight loads (Llama-3-8B batch 1 on an
        # H100: 5.54 ms a step against 5.57, RESULTS.md run DP).
        parts = tl.arange(0, PARTS_BLOCK)
        sumsq = tl.load(sumsq_ptr + rows_m[:, None] * num_parts + parts[None, :],
                        mask=m_ok[:, None] & (parts < num_parts)[None, :], other=0.0)
    if ADD_RMS_STATS:
        residual = tl.load(residual_ptr + rows_m.to(tl.int64)[None, :] * stride_rm + rows_n[:, None],
                           mask=n_ok[:, None] & m_ok[None, :], other=0.0)
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + ks[None, :]        # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows_m.to(tl.int64)[None, :] * stride_xm + ks[:, None]        # [BLOCK_K, BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST_DOT:  # Triton's interpreter multiplies bf16 dot operands as raw bits (triton 3.9)
            acc = tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        elif FP32_IEEE:  # fp32 operands: full fp32 products, as F.linear (no tf32)
            acc = tl.dot(w, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if tl.program_id(0) < early_from:
        pdl_launch_dependents(USE_PDL)
    if RMS_SCALE:
        # A negative entry marks a row that is already normalized (cinfer_ops.norm_linear).
        rstd = tl.rsqrt(tl.maximum(tl.sum(sumsq, axis=1), 0.0) / K + eps)  # [BLOCK_M]
        rstd = tl.where(tl.min(sumsq, axis=1) < 0, 1.0, rstd)
        acc = acc * rstd[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    dtype = out_ptr.dtype.element_ty
    if GATED:
        # [gate rows; up rows] -> (gate, up), each [HALF, BLOCK_M]; then cinfer::silu_mul's rounding: each
        # projection rounded to the dtype, silu in fp32 rounded, the product in fp32 rounded.
        gate, up = tl.split(tl.permute(tl.reshape(acc, (2, HALF, BLOCK_M)), (1, 2, 0)))
        gate = gate.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        result = (act.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
        out_cols = tl.program_id(0) * HALF + tl.arange(0, HALF)
        out_ptrs = out_ptr + rows_m.to(tl.int64)[None, :] * stride_om + out_cols[:, None]
        tl.store(out_ptrs, result, mask=(out_cols < N)[:, None] & m_ok[None, :])
    elif ADD_RMS_STATS:
        # The residual add's rounding, then the norm's: new_residual in the dtype, its squares in fp32. Rows past
        # N hold zeros (weight and residual loaded as zero), so they add nothing to their chunk's sum.
        ok = n_ok[:, None] & m_ok[None, :]
        h = (acc.to(dtype).to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(new_residual_ptr + rows_m.to(tl.int64)[None, :] * stride_om + rows_n[:, None], h, mask=ok)
        hf = h.to(tl.float32)
        g = tl.load(norm_w_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)
        out_ptrs = out_ptr + rows_m.to(tl.int64)[None, :] * stride_om + rows_n[:, None]
        tl.store(out_ptrs, (g[:, None] * hf).to(dtype), mask=ok)
        CHUNKS: tl.constexpr = BLOCK_N // _STATS_CHUNK
        sq = tl.sum(tl.reshape(hf * hf, (CHUNKS, _STATS_CHUNK, BLOCK_M)), axis=1)  # [CHUNKS, BLOCK_M]
        chunk = tl.program_id(0) * CHUNKS + tl.arange(0, CHUNKS)
        tl.store(sumsq_ptr + rows_m[None, :] * num_parts + chunk[:, None], sq,
                 mask=(chunk < num_parts)[:, None] & m_ok[None, :])
    else:
        out_ptrs = out_ptr + rows_m.to(tl.int64)[None, :] * stride_om + rows_n[:, None]
        tl.store(out_ptrs, acc.to(dtype), mask=n_ok[:, None] & m_ok[None, :])


def _check(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)}: last dim must equal weight's in_features {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")


def _check_gated(weight: Tensor) -> None:
    if weight.dim() == 2 and weight.shape[0] % 2:
        raise ValueError(f"a gated weight stacks gate and up rows, so its rows must be even, got {tuple(weight.shape)}")


def _early_from(programs: int, device: torch.device) -> int:
    """The first program of the streaming kernel's grid that lets the next kernel launch before its K loop: all of
    a one-wave grid (at most one program per SM) with ``EARLY_DEPENDENTS``, else none (``programs``). A one-wave
    projection (q/k/v, o_proj, down_proj at batch 1) then has decode attention or the next norm resident and
    waiting on the SMs it leaves idle; in a grid of several waves the next kernel's waiting programs cost the last
    wave more than they save."""
    return 0 if EARLY_DEPENDENTS and programs <= num_sms(device) else programs


def linear_stream_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                         config: LinearConfig | None = None, gated: bool = False) -> Tensor:
    """The streaming kernel for x: [..., K] with at most ``MAX_STREAM_ROWS`` rows, weight [N, K] (unit stride along
    K), bias [N] or None; one dtype of bf16/fp16/fp32. Returns a contiguous [..., N].
    ``gated``: ``linear_silu_mul`` instead, a contiguous [..., N // 2] (the weight stacks gate rows, then up rows)."""
    return _stream(x, weight, bias, config, gated=gated)[0]


def linear_add_rms_stats_triton(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor,
                                norm_weight: Tensor, *, config: LinearConfig | None = None
                                ) -> tuple[Tensor, Tensor, Tensor]:
    """The streaming kernel of ``cinfer::linear_add_rms_stats`` (its operands as there; x of at most
    ``MAX_STREAM_ROWS`` rows). Returns (scaled, new_residual, sumsq), contiguous."""
    return _stream(x, weight, bias, config, add_rms=(residual, norm_weight))


def rms_stats_linear_triton(x: Tensor, sumsq: Tensor, eps: float, weight: Tensor, bias: Tensor | None, *,
                            config: LinearConfig | None = None, gated: bool = False) -> Tensor:
    """The streaming kernel of ``cinfer::rms_stats_linear`` (``gated``: ``cinfer::rms_stats_linear_silu_mul``),
    its operands as there; x of at most ``MAX_STREAM_ROWS`` rows. Returns a contiguous output."""
    return _stream(x, weight, bias, config, gated=gated, rms_scale=(sumsq, eps))[0]


def stats_parts(hidden: int) -> int:
    """The number of partial sums of squares a row of ``hidden`` columns has in ``sumsq``."""
    return triton.cdiv(hidden, STATS_CHUNK)


def check_add_rms(x: Tensor, weight: Tensor, residual: Tensor, norm_weight: Tensor) -> None:
    """Raise ValueError unless residual is [..., N] (x's leading dims) in x's dtype and device and norm_weight is
    [N] on x's device, N = weight's out_features."""
    n = weight.shape[0]
    if residual.shape != (*x.shape[:-1], n) or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} {residual.device} must be "
                         f"{(*x.shape[:-1], n)} {x.dtype} {x.device} (x's rows by weight's out_features)")
    if norm_weight.shape != (n,) or norm_weight.device != x.device:
        raise ValueError(f"norm_weight {tuple(norm_weight.shape)} on {norm_weight.device} must be [{n}] on "
                         f"{x.device} (weight's out_features)")


def check_rms_scale(x: Tensor, sumsq: Tensor) -> None:
    """Raise ValueError unless sumsq is float32 [..., ceil(K / STATS_CHUNK)] (x's leading dims, K = x's last) on
    x's device."""
    parts = stats_parts(x.shape[-1])
    if sumsq.shape != (*x.shape[:-1], parts) or sumsq.dtype != torch.float32 or sumsq.device != x.device:
        raise ValueError(f"sumsq {tuple(sumsq.shape)} {sumsq.dtype} {sumsq.device} must be float32 "
                         f"{(*x.shape[:-1], parts)} on {x.device} (x's rows by ceil(in_features / {STATS_CHUNK}))")


def _stream(x: Tensor, weight: Tensor, bias: Tensor | None, config: LinearConfig | None, *, gated: bool = False,
            add_rms: tuple[Tensor, Tensor] | None = None, rms_scale: tuple[Tensor, float] | None = None
            ) -> tuple[Tensor, ...]:
    _check(x, weight, bias)
    if gated:
        _check_gated(weight)
    n, k = weight.shape
    if gated:
        n //= 2  # output columns
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_STREAM_ROWS:
        raise ValueError(f"the streaming kernel takes at most {MAX_STREAM_ROWS} rows, got {m}")
    config = config or DEFAULT_LINEAR_CONFIG
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    outs = [out]
    # Unused pointers of a variant stand in as `out`.
    residual = norm_weight = new_residual = sumsq = out
    stride_rm, parts, eps = 0, 1, 0.0
    if add_rms is not None:
        residual, norm_weight = add_rms
        check_add_rms(x, weight, residual, norm_weight)
        if gated or config.block_n % STATS_CHUNK:
            raise ValueError(f"linear_add_rms_stats streams a plain weight with block_n a multiple of "
                             f"{STATS_CHUNK}, got gated={gated}, {config}")
        residual = residual.reshape(m, n)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        stride_rm, parts = residual.stride(0), stats_parts(n)
        norm_weight = norm_weight.contiguous()
        new_residual = torch.empty_like(out)
        sumsq = torch.empty((m, parts), dtype=torch.float32, device=x.device)
        outs += [new_residual, sumsq]
    if rms_scale is not None:
        sumsq, eps = rms_scale
        check_rms_scale(x, sumsq)
        parts = stats_parts(k)
        sumsq = sumsq.reshape(m, parts).contiguous()
    if m and n:
        columns = config.block_n // 2 if gated else config.block_n  # output columns per program
        programs = triton.cdiv(n, columns)
        launch(_stream_linear_kernel, (programs,),
            x2, weight, bias if bias is not None else weight, out, m, n, k,
            x2.stride(0), weight.stride(0), out.stride(0), _early_from(programs, x.device),
            residual, norm_weight, new_residual, sumsq, stride_rm, parts, eps,
            HAS_BIAS=bias is not None, BLOCK_M=MAX_STREAM_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            EVEN_K=k % config.block_k == 0, UPCAST_DOT=x.dtype == torch.bfloat16 and x.device.type != "cuda",
            FP32_IEEE=x.dtype == torch.float32, GATED=gated, ADD_RMS_STATS=add_rms is not None,
            RMS_SCALE=rms_scale is not None, PARTS_BLOCK=triton.next_power_of_2(parts),
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_options(x.device),
        )
    lead = x.shape[:-1]
    return tuple([out.view(*lead, n)] + [t.view(*lead, t.shape[-1]) for t in outs[1:]])


@torch.library.custom_op("cinfer::linear", mutates_args=(), device_types="cpu")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)``. x: [..., in_features]; weight: [out_features, in_features]; bias:
    [out_features] or None. Returns a contiguous [..., out_features] in x.dtype."""
    return linear_reference(x, weight, bias).contiguous()


@linear.register_kernel("cuda")
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    config = pick_linear_config(rows, *weight.shape, x.device) if weight.dim() == 2 else None
    if config is None or x.dtype not in _DTYPES or weight.stride(-1) != 1:
        return linear_reference(x, weight, bias).contiguous()
    return linear_stream_triton(x, weight, bias, config=config)


@linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_silu_mul_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``silu_mul(*F.linear(x, weight, bias).chunk(2, -1))``: the two ops it replaces, with their rounding."""
    gate, up = linear_reference(x, weight, bias).chunk(2, -1)
    return silu_mul_reference(gate, up)


@torch.library.custom_op("cinfer::linear_silu_mul", mutates_args=(), device_types="cpu")
def linear_silu_mul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A gated MLP's activation of a fused gate/up projection: with ``y = F.linear(x, weight, bias)`` and ``I =
    out_features // 2``, ``silu(y[..., :I]) * y[..., I:]``. x: [..., in_features]; weight: [2 * I, in_features],
    the gate rows then the up rows; bias: [2 * I] or None. Returns a contiguous [..., I] in x.dtype.

    On the GPU a few-row x runs the streaming kernel with the activation in its epilogue: one kernel instead of
    the projection and ``cinfer::silu_mul``, and the [..., 2 * I] projection is never written."""
    _check(x, weight, bias)
    _check_gated(weight)
    return linear_silu_mul_reference(x, weight, bias)


@linear_silu_mul.register_kernel("cuda")
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check(x, weight, bias)
    _check_gated(weight)
    rows = x.numel() // max(x.shape[-1], 1)
    config = pick_linear_config(rows, *weight.shape, x.device)
    if config is None or x.dtype not in _DTYPES or weight.stride(-1) != 1:
        gate, up = linear_reference(x, weight, bias).chunk(2, -1)
        return silu_mul_triton(gate, up)
    return linear_stream_triton(x, weight, bias, config=config, gated=True)


@linear_silu_mul.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check(x, weight, bias)
    _check_gated(weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))
