"""``cinfer::rms_norm`` and ``cinfer::fused_add_rms_norm``: HF ``LlamaRMSNorm`` and its residual-add fusion.

HF computes ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``: statistics in fp32, the
normalised value rounded to ``x.dtype`` *before* the weight multiply. The kernels keep that double rounding so
they agree with HF to the last bit up to the fp32 summation order.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [..., hidden] (any float dtype), weight: [hidden]. Returns x.dtype, same shape as x."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype)


def fused_add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    new_residual = x + residual
    return rms_norm_reference(new_residual, weight, eps), new_residual


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    x_row_stride, residual_row_stride, out_row_stride, new_residual_row_stride,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per row; the whole row stays in registers so x is read once and out written once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # One rounding to the input dtype, as torch's `hidden_states + residual` does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + row * new_residual_row_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: Tensor) -> Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor | None]:
    hidden = x.shape[-1]
    assert weight.shape == (hidden,), f"weight must be [{hidden}], got {tuple(weight.shape)}"
    x2 = _rows(x)
    out = torch.empty_like(x2)
    if residual is not None:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
        r2 = _rows(residual)
        new_residual = torch.empty_like(x2)
    else:
        r2 = new_residual = x2  # unused: HAS_RESIDUAL=False
    n_rows = x2.shape[0]
    if n_rows:
        block = triton.next_power_of_2(hidden)
        num_warps = min(max(block // 512, 1), 16)
        _rms_norm_kernel[(n_rows,)](
            x2, r2, weight.contiguous(), out, new_residual,
            x2.stride(0), r2.stride(0), out.stride(0), new_residual.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        )
    out = out.view(x.shape)
    return out, (new_residual.view(x.shape) if residual is not None else None)


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _launch(x, residual, weight, eps)


@torch.library.custom_op("cinfer::rms_norm", mutates_args=(), device_types="cpu")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF LlamaRMSNorm. x: [..., hidden], weight: [hidden]; statistics in fp32, result in x.dtype."""
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_triton(x, weight, eps)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("cinfer::fused_add_rms_norm", mutates_args=(), device_types="cpu")
def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """new_residual = x + residual; out = rms_norm(new_residual). Returns (out, new_residual); inputs untouched."""
    return fused_add_rms_norm_reference(x, residual, weight, eps)


@fused_add_rms_norm.register_kernel("cuda")
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return fused_add_rms_norm_triton(x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))
