"""Small helpers for matching HF patterns in Dynamo's (torch-level) FX graphs.

Dynamo records the same operation in several spellings: ``x.pow(2)`` is a ``call_method`` node, ``torch.pow(x, 2)``
a ``call_function`` node, ``x ** 2`` an ``operator.pow`` node. ``op_name`` folds them into one canonical name, with
the tensor operand first in ``args`` in every spelling, so the passes match on names and argument positions only.
Each node carries its fake value in ``node.meta["example_value"]`` (shapes may hold symbolic sizes).
"""
import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

_FUNCTIONS = {
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.pow: "pow", torch.pow: "pow", torch.square: "square",
    torch.mean: "mean", torch.rsqrt: "rsqrt",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    torch.softmax: "softmax", F.softmax: "softmax", torch.transpose: "transpose",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze", operator.getitem: "getitem",
    torch.repeat_interleave: "repeat_interleave", F.dropout: "dropout",
    F.scaled_dot_product_attention: "sdpa", torch._C._nn.scaled_dot_product_attention: "sdpa",
}
_METHOD_ALIASES = {"view": "reshape", "reshape": "reshape", "swapaxes": "transpose", "transpose": "transpose",
                   "div": "div", "true_divide": "div"}


def op_name(node: fx.Node) -> str | None:
    """Canonical name of what ``node`` computes, or None for placeholders, outputs and unknown targets."""
    if node.op == "call_method":
        return _METHOD_ALIASES.get(node.target, node.target)
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return str(node.target)
        return _FUNCTIONS.get(node.target, getattr(node.target, "__name__", None))
    return None


def is_op(node, *names: str) -> bool:
    return isinstance(node, fx.Node) and op_name(node) in names


def op_counts(gm: fx.GraphModule) -> Counter:
    """How often each canonical op occurs in the graph (for reports and tests)."""
    return Counter(name for node in gm.graph.nodes if (name := op_name(node)) is not None)


def fake(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for ``node``, or None when it is not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def same_size(a, b) -> bool:
    """True when two (possibly symbolic) sizes are provably equal; never adds a guard."""
    return statically_known_true(a == b)


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same_size(x, y) for x, y in zip(a.shape, b.shape))


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` (positional, counting the tensor self of a method) or keyword ``name`` of ``node``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_dtype_cast(node) -> bool:
    """``x.to(dtype)``, ``x.float()``, ``x.type(dtype)`` or ``x.type_as(y)``: a cast that keeps the shape."""
    if not is_op(node, "to", "float", "half", "bfloat16", "type", "type_as"):
        return False
    src, out = fake(node.args[0]), fake(node)
    return src is not None and out is not None and same_shape(src, out) and src.device == out.device


def is_parameter(node) -> bool:
    """A module parameter: Dynamo lifts them to placeholders whose fake value is an ``nn.Parameter``."""
    if not isinstance(node, fx.Node):
        return False
    return node.op == "get_attr" or (node.op == "placeholder"
                                     and isinstance(node.meta.get("example_value"), torch.nn.Parameter))


def set_fake(node: fx.Node) -> None:
    """Fill ``node.meta["example_value"]`` by running its target on its inputs' fake values (best effort: later
    passes read shapes of nodes that earlier passes inserted)."""
    values = torch.utils._pytree.tree_leaves([n.meta.get("example_value") for n in node.all_input_nodes])
    fake_mode = next((v.fake_mode for v in values if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode")), None)
    if fake_mode is None:
        return

    def value(a):
        return a.meta.get("example_value") if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    with fake_mode:
        if node.op == "call_method":
            result = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            result = node.target(*args, **kwargs)
    node.meta["example_value"] = result
