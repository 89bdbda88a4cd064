"""Gated-MLP fusion: ``cinfer.linear(silu(gate) * up, W, b)`` -> ``cinfer.silu_mul_linear(gate, up, W, b)``.

HF's ``LlamaMLP`` computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. After the projection pass, ``gate``
and ``up`` are the two halves of one fused GEMM's output; the SiLU and the product are one elementwise kernel of
their own, between two weight-streaming GEMVs at decode. The fused op builds ``silu(gate) * up`` as the down
projection's streaming kernel loads its input (``cinfer_ops.linear``), so that kernel disappears.

It fires when the linear's input is a plain two-operand product, used only there, of ``silu(gate)`` (not in place,
used only by the product) and ``up``, where ``gate``, ``up`` and the product have one shape and one dtype (no
broadcasting, no type promotion). Runs after the linear pass, on its ``cinfer.linear`` nodes.
"""
import logging

import torch
from torch import fx

from graph_passes.fx_utils import arg, fake, finish_pass, is_op, same_shape

logger = logging.getLogger(__name__)


def _silu_input(node) -> fx.Node | None:
    """``x`` if ``node`` is an out-of-place ``silu(x)`` used once, else None."""
    if not is_op(node, "silu", "aten.silu.default") or len(node.users) != 1 or arg(node, 1, "inplace", False):
        return None
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if isinstance(x, fx.Node) else None


def fuse_silu_mul_linear(gm: fx.GraphModule) -> int:
    """Rewrite each ``cinfer.linear`` of a gated product in place; returns how many."""
    count = 0
    for linear in [n for n in gm.graph.nodes if n.target is torch.ops.cinfer.linear.default]:
        x, weight, bias = linear.args
        if not is_op(x, "mul") or len(x.args) != 2 or x.kwargs or len(x.users) != 1:
            continue
        act, up = x.args
        if _silu_input(act) is None:  # mul(up, silu(gate))
            act, up = up, act
        gate = _silu_input(act)
        if gate is None or not isinstance(up, fx.Node):
            continue
        x_val, g_val, u_val = fake(x), fake(gate), fake(up)
        if x_val is None or g_val is None or u_val is None:
            continue
        if not (same_shape(g_val, x_val) and same_shape(u_val, x_val) and g_val.dtype == u_val.dtype == x_val.dtype):
            logger.debug("silu_mul_linear: %s: operands broadcast or promote, skipped", linear.name)
            continue
        with gm.graph.inserting_before(linear):
            fused = gm.graph.call_function(torch.ops.cinfer.silu_mul_linear.default, (gate, up, weight, bias))
        fused.meta.update(linear.meta)  # the same value
        linear.replace_all_uses_with(fused)
        for node in (linear, x, act):
            gm.graph.erase_node(node)
        count += 1
    finish_pass(gm, count > 0)
    return count
