"""``cinfer::rms_norm`` and ``cinfer::fused_add_rms_norm``: HF ``LlamaRMSNorm`` and its residual-add fusion.

HF computes ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``: statistics in fp32, the
normalised value rounded to ``x.dtype`` *before* the weight multiply. The kernels keep that double rounding so
they agree with HF to the last bit up to the fp32 summation order.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from cinfer_ops.launch import launch
from cinfer_ops.pdl import pdl_launch_options, pdl_start

# A whole row lives in registers; beyond this the kernel would spill (no Llama-family model comes close).
MAX_HIDDEN = 65536
# From this many rows on, the launcher takes its many-rows kernel variant (see rms_norm_launch_params). The
# runtime's warm-up runs a step this large so that both variants compile before serving.
MANY_ROWS = 1024


def rms_norm_launch_params(hidden: int, n_rows: int) -> tuple[int, int]:
    """Default (rows_per_program, num_warps). benchmarks/bench_ops.py --sweep measures the alternatives.

    Narrow rows are batched into one program so each program still moves a few KiB; wide rows get one program
    each, with enough warps that every thread holds a couple of 16-byte vectors. Two regimes, so per hidden size
    two compiled variants: below MANY_ROWS rows and from it on.
    """
    block = triton.next_power_of_2(hidden)
    if n_rows < MANY_ROWS:
        return 1, min(max(block // 512, 1), 16)
    # Many rows: ~16K elements and 16 warps a program. On an H200 (2026-11-26 sweep) [8192, 4096] bf16 ran at 84%
    # of copy bandwidth with (4, 16) against 54% with (1, 8); fused_add_rms_norm was at 89% with either.
    rows_per_program = max(1, min(8, 16384 // block))
    return rows_per_program, min(max(block * rows_per_program // 1024, 1), 16)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [..., hidden] (any float dtype), weight: [hidden]. Returns x.dtype, same shape as x, contiguous."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype).contiguous()


def fused_add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, residual: [..., hidden] of one dtype. Returns (rms_norm(x + residual), x + residual), both contiguous."""
    new_residual = (x + residual).contiguous()
    return rms_norm_reference(new_residual, weight, eps), new_residual


# n_rows follows the step's token count: not specialised (Triton would compile a variant for 1 and for multiples
# of 16); it only masks rows, never the contiguous axis.
@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, sumsq_ptr,
    n_rows, x_row_stride, residual_row_stride, hidden, eps, num_parts,
    HAS_RESIDUAL: tl.constexpr, STATS_CHUNK: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    # Each program normalises ROWS whole rows held in registers: x is read once and out written once.
    # Outputs are contiguous, so their row stride is `hidden`.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < hidden
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0)
        # One rounding to the input dtype, as torch's `hidden_states + residual` does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + rows[:, None] * hidden + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / hidden + eps)
        normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
        out = (normed * w[None, :]).to(out_ptr.dtype.element_ty)
    else:  # statistics only: weight * x
        out = (w[None, :] * xf).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * hidden + cols[None, :], out, mask=mask)
    if STATS_CHUNK:
        # The sums of squares of x by STATS_CHUNK columns, or where out is normalized -1 (rms_stats_linear's mark)
        parts = tl.arange(0, BLOCK // STATS_CHUNK)
        if NORMALIZE:
            sq = tl.full((ROWS, BLOCK // STATS_CHUNK), -1.0, tl.float32)
        else:
            sq = tl.sum(tl.reshape(xf * xf, (ROWS, BLOCK // STATS_CHUNK, STATS_CHUNK)), axis=2)
        tl.store(sumsq_ptr + rows[:, None] * num_parts + parts[None, :], sq,
                 mask=(rows < n_rows)[:, None] & (parts < num_parts)[None, :])


@triton.jit(do_not_specialize=["n_rows"])
def _rms_scale_kernel(x_ptr, sumsq_ptr, out_ptr, n_rows, x_row_stride, hidden, num_parts, eps,
                      BLOCK: tl.constexpr, PARTS_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    # One row a program: out = x * rsqrt(sum(sumsq[row]) / hidden + eps), rounded once; x itself where sumsq[row]
    # is negative (already normalized).
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, PARTS_BLOCK)
    sumsq = tl.load(sumsq_ptr + row * num_parts + parts, mask=parts < num_parts, other=0.0)
    rstd = tl.where(tl.min(sumsq, axis=0) < 0, 1.0, tl.rsqrt(tl.maximum(tl.sum(sumsq, axis=0), 0.0) / hidden + eps))
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < hidden, other=0.0)
    tl.store(out_ptr + row * hidden + cols, (x.to(tl.float32) * rstd).to(x.dtype), mask=cols < hidden)


def _rows(t: Tensor) -> Tensor:
    """[..., hidden] -> [rows, hidden] with unit column stride; rows may be strided (no copy for row-strided views)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
            rows_per_program: int | None, num_warps: int | None,
            stats_chunk: int = 0, normalize: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}] (x's last dim), got {tuple(weight.shape)}")
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size must be in 1..{MAX_HIDDEN}, got {hidden}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    x2 = _rows(x)
    n_rows = x2.shape[0]
    out = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} {residual.device} must match "
                             f"x {tuple(x.shape)} {x.dtype} {x.device}")
        r2 = _rows(residual)
        new_residual = torch.empty_like(out)
    else:
        r2 = new_residual = out  # unused: HAS_RESIDUAL=False
    parts = triton.cdiv(hidden, stats_chunk) if stats_chunk else 1
    sumsq = torch.empty((n_rows, parts), dtype=torch.float32, device=x.device) if stats_chunk else out
    if n_rows:
        default_rows, default_warps = rms_norm_launch_params(hidden, n_rows)
        rows_per_program = rows_per_program or default_rows
        if rows_per_program & (rows_per_program - 1):
            raise ValueError(f"rows_per_program must be a power of two, got {rows_per_program}")
        launch(_rms_norm_kernel, (triton.cdiv(n_rows, rows_per_program),),
            x2, r2, weight.contiguous(), out, new_residual, sumsq,
            n_rows, x2.stride(0), r2.stride(0), hidden, eps, parts,
            HAS_RESIDUAL=residual is not None, STATS_CHUNK=stats_chunk, NORMALIZE=normalize,
            BLOCK=max(triton.next_power_of_2(hidden), stats_chunk), ROWS=rows_per_program,
            num_warps=num_warps or default_warps, **pdl_launch_options(x.device),
        )
    out = out.view(x.shape)
    return (out, (new_residual.view(x.shape) if residual is not None else None),
            (sumsq.view(*x.shape[:-1], parts) if stats_chunk else None))


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, *,
                    rows_per_program: int | None = None, num_warps: int | None = None) -> Tensor:
    """Triton launcher of ``rms_norm``. x: [..., hidden] with unit stride along hidden (rows may be strided,
    anything else is copied), weight: [hidden]. Returns a contiguous tensor of x's shape and dtype.
    rows_per_program (a power of two) / num_warps override ``rms_norm_launch_params``."""
    return _launch(x, None, weight, eps, rows_per_program, num_warps)[0]


def add_rms_stats_triton(x: Tensor, residual: Tensor, weight: Tensor, stats_chunk: int, eps: float = 0.0, *,
                         normalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The statistics half of ``fused_add_rms_norm``: with ``h = x + residual`` (rounded), returns (weight * h,
    h, sumsq), sumsq [..., ceil(hidden / stats_chunk)] fp32 holding each ``stats_chunk`` columns' sum of h**2
    (stats_chunk a power of two); ``rms_scale_triton`` finishes the norm. ``normalize``: the whole norm instead,
    (fused_add_rms_norm's out, h, -1 everywhere): the mark of a normalized row."""
    out, new_residual, sumsq = _launch(x, residual, weight, eps, None, None, stats_chunk, normalize)
    return out, new_residual, sumsq


def rms_scale_triton(x: Tensor, sumsq: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(sum(sumsq, -1) / hidden + eps)`` rounded to x.dtype (x itself in rows whose sumsq is negative):
    x [..., hidden] (rows may be strided), sumsq fp32 [..., parts]. Returns a contiguous tensor of x's shape."""
    hidden = x.shape[-1]
    x2, s2 = _rows(x), sumsq.reshape(-1, sumsq.shape[-1]).contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        block = triton.next_power_of_2(hidden)
        launch(_rms_scale_kernel, (x2.shape[0],), x2, s2, out, x2.shape[0], x2.stride(0), hidden, s2.shape[1], eps,
               BLOCK=block, PARTS_BLOCK=triton.next_power_of_2(s2.shape[1]),
               num_warps=rms_norm_launch_params(hidden, 1)[1], **pdl_launch_options(x.device))
    return out.view(x.shape)


def fused_add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor, eps: float, *,
                              rows_per_program: int | None = None,
                              num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``fused_add_rms_norm``: x and residual of one shape and dtype, weight [hidden].
    Returns (out, new_residual), both contiguous; x and residual are only read."""
    out, new_residual, _ = _launch(x, residual, weight, eps, rows_per_program, num_warps)
    return out, new_residual


@torch.library.custom_op("cinfer::rms_norm", mutates_args=(), device_types="cpu")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF LlamaRMSNorm. x: [..., hidden], weight: [hidden]; statistics in fp32, result contiguous in x.dtype."""
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_triton(x, weight, eps)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("cinfer::fused_add_rms_norm", mutates_args=(), device_types="cpu")
def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """new_residual = x + residual; out = rms_norm(new_residual). Returns (out, new_residual), both contiguous in
    x.dtype; inputs untouched."""
    return fused_add_rms_norm_reference(x, residual, weight, eps)


@fused_add_rms_norm.register_kernel("cuda")
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return fused_add_rms_norm_triton(x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))
