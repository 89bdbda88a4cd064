"""Linear pass: ``F.linear(x, W, b)`` -> ``cinfer.linear(x, W, b)``, and HF's MLP tail
``F.linear(F.silu(gate) * up, W, b)`` -> ``cinfer.silu_mul_linear(gate, up, W, b)``.

``cinfer.linear`` computes exactly ``F.linear``; on the GPU it streams the weight with its own Triton kernel when
``x`` has few rows (decode steps) and calls cuBLAS otherwise (see ``cinfer_ops.linear``). Inductor lowers a linear
to a cuBLAS call either way, so nothing it could fuse is lost. The pass runs after ``fuse_projections``, so the
fused q/k/v and gate/up projections are rewritten too.

It fires when the output has the input's dtype (no autocast), does not require grad, and the weight is 2-D (1-D
bias or none). The CPU implementation is ``F.linear`` itself. When the linear's input is ``silu(gate) * up`` read
by nothing else, the few-row kernel forms that product as it loads it (the activation never goes to memory and its
kernel is gone); with more rows the op runs silu, mul and cuBLAS one after another.
"""
import logging

import torch
from torch import fx

from graph_passes.fx_utils import arg, fake, is_op, same_shape

logger = logging.getLogger(__name__)


def _value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The fake value of ``node`` or, for a ``get_attr``, the attribute itself."""
    value = fake(node)
    if value is None and isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _silu_mul(x) -> tuple[fx.Node, fx.Node] | None:
    """(gate, up) when ``x`` is ``silu(gate) * up`` (either operand order), both of x's shape and dtype, with the
    silu and the product read by nothing but the linear; else None."""
    if not is_op(x, "mul") or len(x.users) != 1 or len(x.args) != 2 or x.kwargs:
        return None
    for silu, up in (x.args, x.args[::-1]):
        if (is_op(silu, "silu") and len(silu.users) == 1 and not arg(silu, 1, "inplace", False)
                and isinstance(silu.args[0], fx.Node) and isinstance(up, fx.Node)):
            gate = silu.args[0]
            g, u, out = fake(gate), fake(up), fake(x)
            if (g is not None and u is not None and out is not None and g.dtype == u.dtype == out.dtype
                    and same_shape(g, out) and same_shape(u, out)):
                return gate, up
    return None


def route_linears(gm: fx.GraphModule) -> int:
    """Rewrite every eligible ``F.linear`` of ``gm`` in place; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_op(node, "linear") or not node.args:
            continue
        x, weight, bias = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        x_val, out_val, w_val = fake(x), fake(node), _value(gm, weight)
        b_val = None if bias is None else _value(gm, bias)
        if x_val is None or out_val is None or w_val is None or (bias is not None and b_val is None):
            logger.debug("linear pass: %s: operands without known values", node.name)
            continue
        if out_val.requires_grad or out_val.dtype != x_val.dtype or w_val.dim() != 2 or w_val.dtype != x_val.dtype:
            logger.debug("linear pass: %s: skipped (grad, autocast or a weight of another dtype)", node.name)
            continue
        if b_val is not None and (b_val.dim() != 1 or b_val.dtype != x_val.dtype):
            continue
        gated = _silu_mul(x)
        with gm.graph.inserting_before(node):
            if gated is None:
                new = gm.graph.call_function(torch.ops.cinfer.linear.default, (x, weight, bias))
            else:
                new = gm.graph.call_function(torch.ops.cinfer.silu_mul_linear.default, (*gated, weight, bias))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if gated is not None:
            silu = next(n for n in x.args[:2] if is_op(n, "silu"))
            gm.graph.erase_node(x)
            gm.graph.erase_node(silu)
        count += 1
    if count:
        gm.recompile()
    return count
