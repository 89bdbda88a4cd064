"""Gated-MLP activation: ``silu(gate) * up`` -> ``cinfer.silu_mul(gate, up)``.

HF's ``LlamaMLP`` computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Inductor would fuse the SiLU and the
product into one kernel as well, but launched without programmatic dependent launch: at decode it is the one kernel
of the layer that starts only after the gate/up GEMV has fully drained, and the down projection's GEMV can start only
after it has (see ``cinfer_ops.pdl``). The op is that kernel, launched like the others.

It fires on a plain two-operand product of ``silu(gate)`` (out of place, used only by the product) and ``up``, where
``gate``, ``up`` and the product have one shape and one dtype (no broadcasting, no type promotion).

``fuse_linear_silu_mul`` (the next pass) then folds the fused gate/up projection into the activation: where
``gate`` and ``up`` are the first and second halves of one ``cinfer.linear``'s output and nothing else reads it,
``cinfer.silu_mul(narrow(y, 0, I), narrow(y, I, I))`` with ``y = cinfer.linear(x, W, b)`` becomes
``cinfer.linear_silu_mul(x, W, b)``: at decode one streaming kernel computes the activation in its epilogue, so a
layer launches one kernel fewer and the [tokens, 2 * I] projection is never written.
"""
import logging

import torch
from torch import fx

from graph_passes.fx_utils import arg, fake, finish_pass, is_op, same_shape, same_size

logger = logging.getLogger(__name__)

# False: fuse_linear_silu_mul rewrites nothing (the benchmarks' cinfer_unfused peer); read when a graph is compiled.
LINEAR_SILU_MUL = True


def _silu_input(node) -> fx.Node | None:
    """``x`` if ``node`` is an out-of-place ``silu(x)`` used once, else None."""
    if not is_op(node, "silu", "aten.silu.default") or len(node.users) != 1 or arg(node, 1, "inplace", False):
        return None
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if isinstance(x, fx.Node) else None


def fuse_silu_mul(gm: fx.GraphModule) -> int:
    """Rewrite each ``silu(gate) * up`` of ``gm`` in place; returns how many."""
    count = 0
    for mul in [n for n in gm.graph.nodes if is_op(n, "mul")]:
        if len(mul.args) != 2 or mul.kwargs:
            continue
        act, up = mul.args
        if _silu_input(act) is None:  # up * silu(gate)
            act, up = up, act
        gate = _silu_input(act)
        if gate is None or not isinstance(up, fx.Node):
            continue
        out_val, g_val, u_val = fake(mul), fake(gate), fake(up)
        if out_val is None or g_val is None or u_val is None:
            continue
        if not (same_shape(g_val, out_val) and same_shape(u_val, out_val)
                and g_val.dtype == u_val.dtype == out_val.dtype and g_val.is_floating_point()):
            logger.debug("silu_mul: %s: operands broadcast or promote, skipped", mul.name)
            continue
        with gm.graph.inserting_before(mul):
            fused = gm.graph.call_function(torch.ops.cinfer.silu_mul.default, (gate, up))
        fused.meta.update(mul.meta)  # the same value (contiguous, as torch's product of same-shape operands)
        mul.replace_all_uses_with(fused)
        gm.graph.erase_node(mul)
        gm.graph.erase_node(act)
        count += 1
    finish_pass(gm, count > 0)
    return count


def _half_of(node) -> tuple[fx.Node, int, int] | None:
    """``(y, start, length)`` if ``node`` is ``torch.narrow(y, -1, start, length)`` along y's last dim, used once."""
    if not is_op(node, "narrow") or len(node.users) != 1 or len(node.args) != 4 or node.kwargs:
        return None
    y, dim, start, length = node.args
    y_val = fake(y)
    if y_val is None or not isinstance(dim, int) or dim not in (-1, y_val.dim() - 1):
        return None
    if not isinstance(start, int) or not isinstance(length, int):
        return None
    return y, start, length


def fuse_linear_silu_mul(gm: fx.GraphModule) -> int:
    """Rewrite each ``cinfer.silu_mul`` of the two halves of one ``cinfer.linear`` (gate first) in place; returns
    how many."""
    count = 0
    if not LINEAR_SILU_MUL:
        return 0
    for act in [n for n in gm.graph.nodes if n.target is torch.ops.cinfer.silu_mul.default]:
        gate, up = (_half_of(a) for a in act.args)
        if gate is None or up is None or gate[0] is not up[0]:
            continue
        y = gate[0]
        y_val = fake(y)
        width = gate[2]
        if (y.target is not torch.ops.cinfer.linear.default or len(y.users) != 2 or y_val is None
                or (gate[1], up[1], up[2]) != (0, width, width) or not same_size(y_val.shape[-1], 2 * width)):
            logger.debug("linear_silu_mul: %s: not the gate then up halves of one linear's output", act.name)
            continue
        with gm.graph.inserting_before(act):
            fused = gm.graph.call_function(torch.ops.cinfer.linear_silu_mul.default, y.args)
        fused.meta.update(act.meta)  # the same value: contiguous [..., I]
        halves = list(act.args)
        act.replace_all_uses_with(fused)
        gm.graph.erase_node(act)
        for half in halves:
            gm.graph.erase_node(half)
        gm.graph.erase_node(y)
        count += 1
    finish_pass(gm, count > 0)
    return count
