"""``cinfer::rms_norm_linear`` and ``cinfer::fused_add_rms_norm_linear``: an RMSNorm folded into the projection
that reads it.

In an HF Llama decoder every norm feeds exactly one projection once q/k/v and gate/up are stacked (the final norm
feeds ``lm_head``). At decode the norm is a tiny kernel (a few KiB a row) and the projection streams megabytes of
weight, so launching the norm separately costs a launch and a round trip through memory for nothing. These ops
compute ``F.linear(rms_norm(x), weight)`` (and, for the residual form, also return the sum) in one launch of the
streaming kernel of ``cinfer_ops.linear`` with its norm prologue (``NORM`` 1 or 2):

1. every program first computes each row's rstd over the whole K, reading x (and residual) in ``BLOCK_K`` chunks:
   a row is a few KiB and the same for every program, so after the first program it comes from L2;
2. in the weight-streaming K loop each x chunk is normalised exactly as ``cinfer.rms_norm`` /
   ``cinfer.fused_add_rms_norm`` round it -- the sum ``x + residual`` rounded to the dtype, fp32 statistics,
   ``(h * rstd)`` rounded to the dtype, ``(norm_weight * that)`` rounded to the dtype -- before the dot, so the
   result equals the two ops run one after the other up to the fp32 summation order of the statistics.

For the residual form program 0 alone writes ``new_residual`` (the sum, in x's dtype) into a fresh tensor: the
inputs are never written and no two programs write the same element. Steps with more rows than the streaming
kernel takes (or shapes that ``cinfer_ops.linear`` leaves to cuBLAS) run the norm's own Triton kernel, then
cuBLAS: exactly what the unfolded graph ran.
"""
import torch
from torch import Tensor

from cinfer_ops.linear import (DEFAULT_LINEAR_CONFIG, MAX_STREAM_ROWS, LinearConfig, _check, launch_stream_kernel,
                               linear_reference, stream_config)
from cinfer_ops.rms_norm import (_rows, check_norm_inputs, fused_add_rms_norm_reference, fused_add_rms_norm_triton,
                                 rms_norm_reference, rms_norm_triton)


def _check_norm_linear(x: Tensor, residual: Tensor | None, norm_weight: Tensor, weight: Tensor) -> None:
    check_norm_inputs(x, residual, norm_weight, "norm_weight")
    _check(x, weight, None)


def rms_norm_linear_reference(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    """``F.linear(rms_norm(x, norm_weight, eps), weight)``: the CPU implementation. Contiguous [..., N]."""
    return linear_reference(rms_norm_reference(x, norm_weight, eps), weight, None).contiguous()


def fused_add_rms_norm_linear_reference(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float,
                                        weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(F.linear(rms_norm(x + residual), weight), x + residual)``: the CPU implementation."""
    normed, new_residual = fused_add_rms_norm_reference(x, residual, norm_weight, eps)
    return linear_reference(normed, weight, None).contiguous(), new_residual


def _launch(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor,
            config: LinearConfig | None) -> tuple[Tensor, Tensor | None]:
    _check_norm_linear(x, residual, norm_weight, weight)
    n, k = weight.shape
    x2 = _rows(x)  # [M, K], unit stride along K (rows may stay strided)
    m = x2.shape[0]
    if m > MAX_STREAM_ROWS:
        raise ValueError(f"the streaming kernel takes at most {MAX_STREAM_ROWS} rows, got {m}")
    if m == 0 or n == 0:  # nothing to stream (and with no program, nobody would write new_residual)
        if residual is None:
            return linear_reference(rms_norm_triton(x, norm_weight, eps), weight, None).contiguous(), None
        normed, new_residual = fused_add_rms_norm_triton(x, residual, norm_weight, eps)
        return linear_reference(normed, weight, None).contiguous(), new_residual
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    r2 = new_residual = None
    if residual is not None:
        r2 = _rows(residual)
        new_residual = torch.empty((m, k), dtype=x.dtype, device=x.device)
    launch_stream_kernel(x2, weight, None, out, config or DEFAULT_LINEAR_CONFIG, norm=1 if residual is None else 2,
                         norm_weight=norm_weight.contiguous(), eps=eps, residual=r2, new_residual=new_residual)
    out = out.view(*x.shape[:-1], n)
    return out, (new_residual.view(x.shape) if residual is not None else None)


def rms_norm_linear_triton(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, *,
                           config: LinearConfig | None = None) -> Tensor:
    """The streaming kernel with the RMSNorm prologue. x: [..., K] with at most ``MAX_STREAM_ROWS`` rows and unit
    stride along K (rows may be strided, anything else is copied); norm_weight: [K]; weight: [N, K] of x's dtype
    (bf16/fp16/fp32). Returns a contiguous [..., N] in x's dtype."""
    return _launch(x, None, norm_weight, eps, weight, config)[0]


def fused_add_rms_norm_linear_triton(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor,
                                     *, config: LinearConfig | None = None) -> tuple[Tensor, Tensor]:
    """The streaming kernel with the residual-add + RMSNorm prologue: x and residual of one shape and dtype, at most
    ``MAX_STREAM_ROWS`` rows. Returns (out [..., N], new_residual = x + residual), both contiguous; x and residual
    are only read."""
    out, new_residual = _launch(x, residual, norm_weight, eps, weight, config)
    return out, new_residual


@torch.library.custom_op("cinfer::rms_norm_linear", mutates_args=(), device_types="cpu")
def rms_norm_linear(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    """``F.linear(rms_norm(x, norm_weight, eps), weight)``. x: [..., K]; norm_weight: [K]; weight: [N, K] of x's
    dtype. Returns a contiguous [..., N] in x.dtype."""
    _check_norm_linear(x, None, norm_weight, weight)
    return rms_norm_linear_reference(x, norm_weight, eps, weight)


@rms_norm_linear.register_kernel("cuda")
def _(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    _check_norm_linear(x, None, norm_weight, weight)
    config = stream_config(x, weight)
    if config is None:  # as unfolded: the norm's kernel, then cuBLAS
        return linear_reference(rms_norm_triton(x, norm_weight, eps), weight, None).contiguous()
    return rms_norm_linear_triton(x, norm_weight, eps, weight, config=config)


@rms_norm_linear.register_fake
def _(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("cinfer::fused_add_rms_norm_linear", mutates_args=(), device_types="cpu")
def fused_add_rms_norm_linear(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float,
                              weight: Tensor) -> tuple[Tensor, Tensor]:
    """new_residual = x + residual; out = F.linear(rms_norm(new_residual, norm_weight, eps), weight). x, residual:
    [..., K] of one dtype; norm_weight: [K]; weight: [N, K]. Returns (out [..., N], new_residual [..., K]), both
    contiguous in x.dtype; inputs untouched."""
    _check_norm_linear(x, residual, norm_weight, weight)
    return fused_add_rms_norm_linear_reference(x, residual, norm_weight, eps, weight)


@fused_add_rms_norm_linear.register_kernel("cuda")
def _(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> tuple[Tensor, Tensor]:
    _check_norm_linear(x, residual, norm_weight, weight)
    config = stream_config(x, weight)
    if config is None:  # as unfolded: the norm's kernel, then cuBLAS
        normed, new_residual = fused_add_rms_norm_triton(x, residual, norm_weight, eps)
        return linear_reference(normed, weight, None).contiguous(), new_residual
    return fused_add_rms_norm_linear_triton(x, residual, norm_weight, eps, weight, config=config)


@fused_add_rms_norm_linear.register_fake
def _(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> tuple[Tensor, Tensor]:
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            torch.empty_like(x, memory_format=torch.contiguous_format))
