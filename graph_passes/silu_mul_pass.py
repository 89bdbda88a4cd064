"""Gated-MLP activation: ``silu(gate) * up`` -> ``cinfer.silu_mul(gate, up)``.

HF's ``LlamaMLP`` computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Inductor would fuse the SiLU and the
product into one kernel as well, but launched without programmatic dependent launch: at decode it is the one kernel
of the layer that starts only after the gate/up GEMV has fully drained, and the down projection's GEMV can start only
after it has (see ``cinfer_ops.pdl``). The op is that kernel, launched like the others.

It fires on a plain two-operand product of ``silu(gate)`` (out of place, used only by the product) and ``up``, where
``gate``, ``up`` and the product have one shape and one dtype (no broadcasting, no type promotion).
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
