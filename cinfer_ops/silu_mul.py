"""``cinfer::silu_mul``: ``silu(gate) * up``, the activation of a gated MLP (HF's ``LlamaMLP``).

Inductor would fuse the two into one kernel too; this op exists so that the kernel is launched with programmatic
dependent launch (``cinfer_ops.pdl``) like every other kernel of a decode step: it is resident and waiting when the
gate/up GEMV ends, and the down projection's GEMV is resident when it ends, so neither launch is on the critical
path. The rounding is torch's for 16-bit inputs: ``silu`` in fp32 rounded to the input dtype, then the product.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from cinfer_ops.launch import launch
from cinfer_ops.pdl import pdl_launch_options, pdl_start


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    """HF's ``act_fn(gate) * up`` with SiLU, in the inputs' dtype; contiguous."""
    return (F.silu(gate) * up).contiguous()


@triton.jit(do_not_specialize=["n_rows"])
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_rows, width, stride_g, stride_u, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    # Program (row, column block); out is contiguous.
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    g = tl.load(gate_ptr + row * stride_g + cols, mask=ok, other=0.0)
    u = tl.load(up_ptr + row * stride_u + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * width + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def _check(gate: Tensor, up: Tensor) -> None:
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up {tuple(up.shape)} {up.dtype} {up.device} must match gate {tuple(gate.shape)} "
                         f"{gate.dtype} {gate.device}")
    if not gate.is_floating_point() or gate.dim() == 0:
        raise ValueError(f"gate must be a float tensor with at least one dim, got {gate.dtype} {tuple(gate.shape)}")


def _rows(t: Tensor) -> Tensor:
    """[..., width] -> [rows, width] with unit stride along width (row-strided views stay views)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def silu_mul_triton(gate: Tensor, up: Tensor, *, block: int | None = None) -> Tensor:
    """Triton launcher of ``silu_mul``: gate/up [..., width] of one shape and dtype, rows may be strided (the halves
    of a fused gate/up projection's output). Returns a contiguous tensor of gate's shape."""
    _check(gate, up)
    width = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block = block or min(triton.next_power_of_2(width), 2048)
        launch(_silu_mul_kernel, (g2.shape[0], triton.cdiv(width, block)),
            g2, u2, out, g2.shape[0], width, g2.stride(0), u2.stride(0), BLOCK=block,
            num_warps=max(1, min(8, block // 256)), **pdl_launch_options(gate.device))
    return out.view(gate.shape)


@torch.library.custom_op("cinfer::silu_mul", mutates_args=(), device_types="cpu")
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``: gate and up of one shape and float dtype (any row strides). Returns a contiguous tensor
    of that shape and dtype."""
    _check(gate, up)
    return silu_mul_reference(gate, up)


@silu_mul.register_kernel("cuda")
def _(gate: Tensor, up: Tensor) -> Tensor:
    return silu_mul_triton(gate, up)


@silu_mul.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    _check(gate, up)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)
