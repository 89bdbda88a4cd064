"""An RMSNorm split across the two projections around it, so that a decode step launches no norm kernel.

In an HF decoder layer a projection (``o_proj``, ``down_proj``) is followed by the residual add and the next norm,
whose output feeds the next projections (q/k/v, gate/up):

    h = F.linear(a, W1) + residual;   x = g * rms_norm(h);   y = F.linear(x, W2)

At batch 1 the norm kernel between the two GEMVs moves 16 KiB but sits on the critical path: about 1.7 µs of a
decode step per norm, two a layer (``benchmarks/RESULTS.md`` run BT). Since ``W2 @ (g * h * rstd) = rstd * (W2 @
(g * h))`` with one ``rstd`` a row, the norm splits into what each GEMV can do without waiting for a whole row:

- ``cinfer::linear_add_rms_stats(a, W1, b1, residual, g, eps) -> (scaled, h, sumsq)``: the first projection, whose
  epilogue adds the residual (``h``), writes ``scaled = g * h`` and the sums of squares of ``h`` by chunks of
  ``STATS_CHUNK`` columns (``sumsq``, fp32 ``[..., ceil(N / STATS_CHUNK)]``): each streaming program owns whole
  chunks, so there are no atomics and nothing to zero.
- ``cinfer::rms_stats_linear(scaled, sumsq, eps, W2, b2)`` (and ``rms_stats_linear_silu_mul``, the gated MLP's):
  the second projection of ``scaled``, each row's accumulator scaled by ``rstd = rsqrt(sum(sumsq) / K + eps)``
  after the K loop. The K loop is the plain kernel's: folding the whole norm into it (run DK, session 13) put
  elementwise work on every x chunk and was slower than the norm kernel it removed.

Rounding: HF rounds ``h * rstd`` to the dtype before multiplying by ``g``; here ``g * h`` is rounded and the
product's accumulator is scaled, so results agree with HF to the dtype's rounding, not to the last bit. Range: in
fp16, ``g * h`` overflows where ``|g * h|`` passes 65504 (HF multiplies the normalized value instead); a residual
stream that large is itself at the edge of fp16's range.

More rows than the streaming kernel takes (``MAX_STREAM_ROWS``: prefill, large decode batches) run on cuBLAS,
where splitting gains nothing: there ``linear_add_rms_stats`` returns the norm's output itself (HF's rounding, as
``fused_add_rms_norm``) with every ``sumsq`` entry ``NORMALIZED`` (-1), and ``rms_stats_linear`` of as many rows
is the plain projection, so those steps launch what they did before the split. The mark is for rows picked out of
such an output (``lm_head`` reads the prompts' last rows of a prefill): few enough to stream, the kernel scales
them by 1. Rows at or under the limit whose weight the GPU's table leaves to cuBLAS take a statistics kernel after
the first projection and a scaling kernel (which honours the mark) before the second. (A mark in the data rather
than a flag: the alternative, a scaling kernel before every cuBLAS projection, cost 1.1% at batch 64, run DO.)
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from cinfer_ops.linear import (
    _DTYPES, MAX_STREAM_ROWS, STATS_CHUNK, LinearConfig, _check, _check_gated, check_add_rms, check_rms_scale,
    linear_add_rms_stats_triton, linear_reference, pick_linear_config, rms_stats_linear_triton, stats_parts,
)
from cinfer_ops.rms_norm import add_rms_stats_triton, rms_norm_reference, rms_scale_triton
from cinfer_ops.silu_mul import silu_mul_reference, silu_mul_triton


# sumsq's value in a row whose x is already normalized (sums of squares are never negative); the kernels test
# for a negative entry.
NORMALIZED = -1.0


def _rows(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _streams(x: Tensor, weight: Tensor, stats: bool = False) -> LinearConfig | None:
    """The streaming kernel's config for this call, or None where it runs on cuBLAS. ``stats``: for
    ``linear_add_rms_stats``, whose programs own whole chunks of columns."""
    config = pick_linear_config(_rows(x), *weight.shape, x.device)
    if config is None or x.dtype not in _DTYPES or weight.stride(-1) != 1 or (stats and config.block_n % STATS_CHUNK):
        return None
    return config


def normalizes(x: Tensor) -> bool:
    """Whether ``linear_add_rms_stats`` of x returns the normalized value (more rows than the streaming kernel
    takes), and so ``rms_stats_linear`` of as many rows is the plain projection."""
    return _rows(x) > MAX_STREAM_ROWS


def linear_add_rms_stats_reference(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor,
                                   norm_weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    h = (linear_reference(x, weight, bias) + residual).contiguous()
    n = h.shape[-1]
    parts = stats_parts(n)
    if normalizes(x):
        return rms_norm_reference(h, norm_weight, eps), h, h.new_full((*h.shape[:-1], parts), NORMALIZED,
                                                                        dtype=torch.float32)
    hf = h.float()
    squares = F.pad(hf * hf, (0, parts * STATS_CHUNK - n))
    sumsq = squares.view(*h.shape[:-1], parts, STATS_CHUNK).sum(-1)
    return (norm_weight.float() * hf).to(x.dtype).contiguous(), h, sumsq


def _rstd(x: Tensor, sumsq: Tensor, eps: float) -> Tensor:
    """Each row's rstd, 1 for rows marked normalized (a negative sumsq)."""
    rstd = torch.rsqrt(sumsq.sum(-1, keepdim=True) / x.shape[-1] + eps)
    return torch.where(sumsq.amin(-1, keepdim=True) < 0, torch.ones_like(rstd), rstd)


def rms_stats_linear_reference(x: Tensor, sumsq: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The product in x's dtype, scaled in fp32 and rounded again (the CPU implementation; the streaming kernel
    scales its fp32 accumulator and rounds once)."""
    if normalizes(x):
        return linear_reference(x, weight, bias).contiguous()
    out = F.linear(x, weight).float() * _rstd(x, sumsq, eps)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).contiguous()


def _normalized(x: Tensor, sumsq: Tensor, eps: float) -> Tensor:
    """x scaled by its rows' rstd for a cuBLAS projection: a kernel, unless x is normalized (many rows)."""
    return x if normalizes(x) else rms_scale_triton(x, sumsq, eps)


def _check_stats_linear(x: Tensor, sumsq: Tensor, weight: Tensor, bias: Tensor | None, gated: bool) -> None:
    _check(x, weight, bias)
    if gated:
        _check_gated(weight)
    check_rms_scale(x, sumsq)


@torch.library.custom_op("cinfer::linear_add_rms_stats", mutates_args=(), device_types="cpu")
def linear_add_rms_stats(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, norm_weight: Tensor,
                         eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``h = F.linear(x, weight, bias) + residual`` (each rounded to x.dtype). Returns ``(scaled, h, sumsq)``:
    ``scaled = norm_weight * h`` rounded to x.dtype, and sumsq, fp32 ``[..., ceil(N / STATS_CHUNK)]``, each
    ``STATS_CHUNK`` columns' sum of ``h**2`` in fp32; for x of more than ``MAX_STREAM_ROWS`` rows, ``scaled`` is
    ``fused_add_rms_norm``'s output (``eps`` is the norm's) and sumsq -1 everywhere. x: [..., K]; weight: [N, K];
    bias: [N] or None; residual: [..., N] in x.dtype; norm_weight: [N]. All contiguous; inputs untouched."""
    _check(x, weight, bias)
    check_add_rms(x, weight, residual, norm_weight)
    return linear_add_rms_stats_reference(x, weight, bias, residual, norm_weight, eps)


@linear_add_rms_stats.register_kernel("cuda")
def _(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, norm_weight: Tensor,
      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias)
    check_add_rms(x, weight, residual, norm_weight)
    config = None if normalizes(x) else _streams(x, weight, stats=True)
    if config is not None:
        return linear_add_rms_stats_triton(x, weight, bias, residual, norm_weight, config=config)
    return add_rms_stats_triton(linear_reference(x, weight, bias), residual, norm_weight, STATS_CHUNK, eps,
                                normalize=normalizes(x))


@linear_add_rms_stats.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, norm_weight: Tensor,
      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias)
    check_add_rms(x, weight, residual, norm_weight)
    shape = (*x.shape[:-1], weight.shape[0])
    return (x.new_empty(shape), x.new_empty(shape),
            x.new_empty((*x.shape[:-1], stats_parts(weight.shape[0])), dtype=torch.float32))


@torch.library.custom_op("cinfer::rms_stats_linear", mutates_args=(), device_types="cpu")
def rms_stats_linear(x: Tensor, sumsq: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x * rstd, weight, bias)`` with ``rstd = rsqrt(sum(sumsq, -1) / K + eps)`` per row (1 for a row
    whose sumsq is negative: x is normalized): the projection of an RMSNorm whose statistics
    ``linear_add_rms_stats`` computed (x is its ``scaled``). x of more than ``MAX_STREAM_ROWS`` rows is taken as
    normalized, as that op returns it. x: [..., K]; sumsq: fp32 [..., ceil(K / STATS_CHUNK)]; weight: [N, K];
    bias: [N] or None. Returns a contiguous [..., N]."""
    _check_stats_linear(x, sumsq, weight, bias, False)
    return rms_stats_linear_reference(x, sumsq, eps, weight, bias)


@rms_stats_linear.register_kernel("cuda")
def _(x: Tensor, sumsq: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check_stats_linear(x, sumsq, weight, bias, False)
    config = _streams(x, weight)
    if config is not None:
        return rms_stats_linear_triton(x, sumsq, eps, weight, bias, config=config)
    return linear_reference(_normalized(x, sumsq, eps), weight, bias).contiguous()


@rms_stats_linear.register_fake
def _(x: Tensor, sumsq: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check_stats_linear(x, sumsq, weight, bias, False)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("cinfer::rms_stats_linear_silu_mul", mutates_args=(), device_types="cpu")
def rms_stats_linear_silu_mul(x: Tensor, sumsq: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``cinfer::linear_silu_mul`` of ``x * rstd`` (as ``rms_stats_linear``): weight [2 * I, K] stacks the gate
    rows, then the up rows; each half rounded to x.dtype before the activation. Returns a contiguous [..., I]."""
    _check_stats_linear(x, sumsq, weight, bias, True)
    gate, up = rms_stats_linear_reference(x, sumsq, eps, weight, bias).chunk(2, -1)
    return silu_mul_reference(gate, up)


@rms_stats_linear_silu_mul.register_kernel("cuda")
def _(x: Tensor, sumsq: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check_stats_linear(x, sumsq, weight, bias, True)
    config = _streams(x, weight)
    if config is not None:
        return rms_stats_linear_triton(x, sumsq, eps, weight, bias, config=config, gated=True)
    gate, up = linear_reference(_normalized(x, sumsq, eps), weight, bias).chunk(2, -1)
    return silu_mul_triton(gate, up)


@rms_stats_linear_silu_mul.register_fake
def _(x: Tensor, sumsq: Tensor, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check_stats_linear(x, sumsq, weight, bias, True)
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))
