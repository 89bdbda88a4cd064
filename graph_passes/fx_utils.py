"""Small helpers for matching HF patterns in Dynamo's (torch-level) FX graphs.

Dynamo records the same operation in several spellings: ``x.pow(2)`` is a ``call_method`` node, ``torch.pow(x, 2)``
a ``call_function`` node, ``x ** 2`` an ``operator.pow`` node. ``op_name`` folds them into one canonical name, with
the tensor operand first in ``args`` in every spelling, so the passes match on names and argument positions only.
Each node carries its fake value in ``node.meta["example_value"]`` (shapes may hold symbolic sizes). Nodes a pass
inserts get theirs lazily (``set_fake``): ``fake`` computes it on first read, and ``finish_pass`` fills the rest.
"""
import contextlib
import operator
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import disable_fake_tensor_cache
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
    """The fake tensor Dynamo recorded for ``node`` (computed now if a pass deferred it), or None when it is not a
    tensor."""
    value = meta_value(node) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def meta_value(node):
    """``node``'s recorded value (a fake tensor, a SymInt, a tuple of them...), computed now if a pass deferred it
    (``set_fake``); ``node`` itself when it is not a node (a constant argument)."""
    if not isinstance(node, fx.Node):
        return node
    if node.meta.get(_PENDING):
        _fill_pending(node)
    return node.meta.get("example_value", node.meta.get("val"))


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


_PENDING = "cinfer_fake_pending"


def set_fake(node: fx.Node) -> None:
    """Give ``node`` (inserted by a pass) the fake value of its target run on its inputs' fake values, best effort:
    later passes read shapes of nodes that earlier passes inserted. Deferred: ``fake`` computes it when first read,
    ``finish_pass`` when the pass (or the pass manager) hands the graph on. Each is a fake-tensor dispatch over
    symbolic sizes (a fraction of a millisecond); of the eleven nodes per layer the attention pass inserts, the RoPE
    pass removes six, which then never pay for one."""
    node.meta.pop("example_value", None)
    node.meta[_PENDING] = True


def _fill_pending(node: fx.Node) -> None:
    """Compute the deferred fake values ``node`` needs: its pending inputs first (iteratively: a chain of inserted
    nodes may run through every layer), then ``node``."""
    order, stack, seen = [], [(node, False)], set()
    while stack:
        n, inputs_done = stack.pop()
        if inputs_done:
            order.append(n)
            continue
        if n in seen:
            continue
        seen.add(n)
        stack.append((n, True))
        stack.extend((i, False) for i in n.all_input_nodes if i.meta.get(_PENDING) and i not in seen)
    for n in order:
        _compute_fake(n)


def _compute_fake(node: fx.Node) -> None:
    del node.meta[_PENDING]
    args = fx.node.map_aggregate(node.args, meta_value)
    kwargs = fx.node.map_aggregate(node.kwargs, meta_value)
    values = torch.utils._pytree.tree_leaves([args, kwargs])
    fake_mode = next((v.fake_mode for v in values if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode")), None)
    if fake_mode is None:
        return
    with fake_mode, uncached(fake_mode):
        if node.op == "call_method":
            result = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            result = node.target(*args, **kwargs)
    node.meta["example_value"] = result


def uncached(fake_mode):
    """Run fake ops without the fake-tensor cache: a cache hit rebuilds a view's output with ``set_`` over symbolic
    sizes, about twice what computing it afresh costs (torch 2.11: squeeze, transpose, narrow), and the ops passes
    insert are mostly views. The values are the same either way."""
    return disable_fake_tensor_cache(fake_mode)


def finish_pass(gm: fx.GraphModule, changed: bool) -> None:
    """End of a pass that ``changed`` the graph: fill every deferred fake value and regenerate ``gm``'s code, so a
    pass run on its own hands on a complete graph. Inside ``passes_deferred(gm)`` (the pass manager) both wait for
    the last pass: the next pass computes only the fake values it reads, and nodes it removes never get one."""
    if changed and gm not in _DEFERRED:
        fill_pending_fakes(gm)
        gm.recompile()


_DEFERRED: "weakref.WeakSet[fx.GraphModule]" = weakref.WeakSet()


@contextlib.contextmanager
def passes_deferred(gm: fx.GraphModule):
    """Run several passes over ``gm`` with ``finish_pass``'s work done once, at the end (if no pass raised): the
    fake values still deferred then (nodes removed in between never get one), and the code (a plain GraphModule's
    ``recompile`` generates Python for the whole graph, tens of milliseconds a call at 32 layers)."""
    _DEFERRED.add(gm)
    try:
        yield
    finally:
        _DEFERRED.discard(gm)
    fill_pending_fakes(gm)
    gm.recompile()


def fill_pending_fakes(gm: fx.GraphModule) -> None:
    """Compute every fake value still deferred (``set_fake``) in ``gm``, in graph order: a Dynamo graph has one on
    every node, and AOTAutograd's cache, for one, refuses a method called on a node without it."""
    for node in gm.graph.nodes:
        if node.meta.get(_PENDING):
            _compute_fake(node)
