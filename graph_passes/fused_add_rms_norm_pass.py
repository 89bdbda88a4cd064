"""Residual-add fusion: ``h = a + b; n = cinfer.rms_norm(h, w, eps)`` -> ``cinfer.fused_add_rms_norm(a, b, w, eps)``.

Runs after the RMSNorm pass. In an HF decoder layer the residual add before ``post_attention_layernorm``, before the
next layer's ``input_layernorm`` and before the final norm all have this shape; the sum ``h`` usually feeds the next
residual add too, so it is taken from the fused op's second output. The add must be a plain same-shape,
same-dtype tensor add (no broadcasting, no ``alpha``), since the op computes exactly ``x + residual`` in ``x.dtype``.
"""
import logging
import operator

import torch
from torch import fx

from graph_passes.fx_utils import fake, finish_pass, is_op, same_shape, set_fake

logger = logging.getLogger(__name__)


def _plain_add(node) -> tuple[fx.Node, fx.Node] | None:
    if not is_op(node, "add") or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    out, a_val, b_val = fake(node), fake(a), fake(b)
    if out is None or a_val is None or b_val is None:
        return None
    if not (same_shape(a_val, out) and same_shape(b_val, out) and a_val.dtype == b_val.dtype == out.dtype
            and a_val.device == b_val.device == out.device):
        return None
    return a, b


def _nodes_between(first: fx.Node, last: fx.Node) -> set[fx.Node]:
    """The nodes strictly between ``first`` and ``last`` in graph order (``last`` follows ``first``)."""
    nodes, node = set(), first.next
    while node is not last:
        nodes.add(node)
        node = node.next
    return nodes


def fuse_add_rms_norm(gm: fx.GraphModule) -> int:
    """Fold each residual add feeding a ``cinfer.rms_norm`` into ``cinfer.fused_add_rms_norm``; returns the count."""
    count = 0
    for norm in [n for n in gm.graph.nodes if n.target is torch.ops.cinfer.rms_norm.default]:
        add = norm.args[0]
        operands = _plain_add(add)
        if operands is None:
            continue
        # HF writes `residual + hidden_states`; the op's `x` is the fresh value, `residual` the running sum.
        residual, x = operands
        _, weight, eps = norm.args
        # The fused op replaces the sum too, so it must come before every user of the sum, and after its own
        # inputs: the norm's weight may be defined between the add and the norm (a get_attr placed at its first
        # use, as Dynamo does with install_free_tensors). Take the norm's place, unless the sum is used before it.
        between = _nodes_between(add, norm)
        if any(user in between for user in add.users):
            logger.debug("fused_add_rms_norm: %s is used before %s, skipped", add.name, norm.name)
            continue
        with gm.graph.inserting_before(norm):
            fused = gm.graph.call_function(torch.ops.cinfer.fused_add_rms_norm.default, (x, residual, weight, eps))
        with gm.graph.inserting_after(fused):
            out = gm.graph.call_function(operator.getitem, (fused, 0))
        with gm.graph.inserting_after(out):
            new_residual = gm.graph.call_function(operator.getitem, (fused, 1))
        for node in (fused, out, new_residual):
            node.meta.update({k: v for k, v in norm.meta.items() if k in ("nn_module_stack", "stack_trace")})
            set_fake(node)
        norm.replace_all_uses_with(out)
        add.replace_all_uses_with(new_residual)
        # `fused` itself reads `add`'s operands, not `add`, so the rewiring above cannot create a cycle; every user
        # of `add` follows the norm, hence `fused`.
        gm.graph.erase_node(norm)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
    finish_pass(gm, count > 0)
    return count
