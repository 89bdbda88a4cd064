"""Linear pass: ``F.linear(x, W, b)`` -> ``cinfer.linear(x, W, b)``.

``cinfer.linear`` computes exactly ``F.linear``; on the GPU it streams the weight with its own Triton kernel when
``x`` has few rows (decode steps) and calls cuBLAS otherwise (see ``cinfer_ops.linear``). Inductor lowers a linear
to a cuBLAS call either way, so nothing it could fuse is lost. The pass runs after ``fuse_projections``, so the
fused q/k/v and gate/up projections are rewritten too.

It fires when the output has the input's dtype (no autocast), does not require grad, and the weight is 2-D (1-D
bias or none). The CPU implementation is ``F.linear`` itself.
"""
import logging

import torch
from torch import fx

from graph_passes.fx_utils import arg, fake, finish_pass, is_op

logger = logging.getLogger(__name__)


def _value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The fake value of ``node`` or, for a ``get_attr``, the attribute itself."""
    value = fake(node)
    if value is None and isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


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
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.cinfer.linear.default, (x, weight, bias))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    finish_pass(gm, count > 0)
    return count
