"""RMSNorm pass: HF's RMSNorm (Llama, Mistral, Qwen2 share it) -> ``cinfer.rms_norm``.

HF writes ``weight * (xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)`` with ``xf = x.to(float32)``.
The pass anchors on each ``rsqrt`` and walks out from it; it fires only when

- the statistics are the fp32 mean of squares over the last dim, with ``keepdim``, plus a constant ``eps``;
- the normalised value is cast back to ``x.dtype`` (or ``x`` is fp32 already) *before* the weight multiply;
- the multiplier is a module parameter of shape ``[hidden]`` (so Gemma's ``x * (1 + weight)`` in fp32 is left
  alone: its rounding differs from ``cinfer.rms_norm``'s);
- the result has ``x``'s dtype and shape (a weight of another dtype would promote it).
"""
import logging

import torch
from torch import fx

from graph_passes.fx_utils import (arg, fake, finish_pass, is_dtype_cast, is_op, is_parameter, same_shape, same_size,
                                   set_fake)

logger = logging.getLogger(__name__)


def _other(node: fx.Node, known: fx.Node):
    """The operand of binary ``node`` that is not ``known`` (None when ``known`` is not an operand)."""
    a, b = node.args[0], node.args[1]
    if a is known:
        return b
    if b is known:
        return a
    return None


def _reduces_last_dim(mean: fx.Node) -> bool:
    dim, keepdim = arg(mean, 1, "dim"), arg(mean, 2, "keepdim", False)
    src, out = fake(mean.args[0]), fake(mean)
    if src is None or out is None or keepdim is not True:
        return False
    if isinstance(dim, list | tuple):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return dim in (-1, src.dim() - 1)


def match_rms_norm(rsqrt: fx.Node) -> tuple[fx.Node, fx.Node, float, fx.Node] | None:
    """If ``rsqrt`` is the core of an HF RMSNorm, return ``(x, weight, eps, output_node)``."""
    add = rsqrt.args[0]
    if not is_op(add, "add") or len(add.args) != 2 or add.kwargs:
        return None
    variance, eps = add.args
    if isinstance(variance, int | float):
        variance, eps = eps, variance
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not is_op(variance, "mean"):
        return None
    if not _reduces_last_dim(variance):
        return None
    square = variance.args[0]
    if is_op(square, "pow") and arg(square, 1, "exponent") == 2:
        xf = square.args[0]
    elif is_op(square, "square"):
        xf = square.args[0]
    elif is_op(square, "mul") and square.args[0] is square.args[1]:
        xf = square.args[0]
    else:
        return None
    xf_val = fake(xf)
    if xf_val is None or xf_val.dtype != torch.float32:
        return None
    x = xf.args[0] if is_dtype_cast(xf) else xf
    x_val = fake(x)
    if x_val is None or not same_shape(x_val, xf_val):
        return None

    scaled = next((u for u in rsqrt.users if is_op(u, "mul") and _other(u, rsqrt) is xf), None)
    if scaled is None:
        return None
    cast_back = next((u for u in scaled.users if is_dtype_cast(u)), None)
    if cast_back is not None and fake(cast_back).dtype == x_val.dtype:
        normed = cast_back
    elif x_val.dtype == torch.float32:
        normed = scaled
    else:
        return None
    for out in normed.users:
        if not is_op(out, "mul") or len(out.args) != 2:
            continue
        weight = _other(out, normed)
        w_val, out_val = fake(weight), fake(out)
        if (is_parameter(weight) and w_val is not None and w_val.dim() == 1
                and same_size(w_val.shape[0], x_val.shape[-1]) and out_val is not None
                and out_val.dtype == x_val.dtype and same_shape(out_val, x_val)):
            return x, weight, float(eps), out
    return None


def fuse_rms_norm(gm: fx.GraphModule) -> int:
    """Replace every HF RMSNorm in ``gm`` by ``cinfer.rms_norm(x, weight, eps)``; returns the number replaced."""
    count = 0
    for rsqrt in [n for n in gm.graph.nodes if is_op(n, "rsqrt")]:
        match = match_rms_norm(rsqrt)
        if match is None:
            logger.debug("rms_norm: rsqrt %s is not an HF RMSNorm", rsqrt.name)
            continue
        x, weight, eps, out = match
        with gm.graph.inserting_before(out):
            norm = gm.graph.call_function(torch.ops.cinfer.rms_norm.default, (x, weight, eps))
        norm.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace")})
        set_fake(norm)
        out.replace_all_uses_with(norm)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
    finish_pass(gm, count > 0)
    return count
