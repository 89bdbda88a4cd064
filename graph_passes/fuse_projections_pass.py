"""Projection fusion: linears that read the same input -> one linear over their concatenated weights.

Each HF decoder layer projects one normed hidden state three times for attention (q, k, v) and twice for the MLP
(gate, up). At decode every projection is a weight-bandwidth-bound GEMV, so one GEMM over the stacked weights reads
the same bytes in one kernel instead of three (or two); the small k/v projections stop being launch-bound. The pass
rewrites, for a group of ``n >= 2`` projections of the same input node ``x``::

    y_i = linear(x, W_i, b_i)                     W_i: [out_i, in]
 -> y   = linear(x, W, b)                         W = cat(W_1..W_n): [sum(out_i), in], a constant of the GraphModule
    y_i = narrow(y, -1, offset_i, out_i)          views of y (row stride sum(out_i)), feeding y_i's users

It fires only when that is exact: the ``F.linear`` calls share the input node; their weights (and biases) are module
parameters whose real values are known -- Dynamo's parameter placeholders mapped to ``example_inputs`` by position,
or ``get_attr`` attributes; fakes and tensor subclasses are skipped -- 2-D (1-D) and contiguous, of one dtype and
device, with the input's and output's dtype (so no autocast is involved), the same ``in_features``, all with or all
without a bias, each used by nothing else in the graph; the outputs do not require grad (inference: the constant
would cut the parameters off from autograd); and no node between the first and the last call of the group may
mutate anything. The pass matches no module names.

Weights are never duplicated. ``W`` is built once (``torch.cat`` at compile time) and every parameter's ``.data`` is
re-pointed to its rows of ``W``: the user's model keeps identical values (eagerly too) and the memory stays one copy.
When the parameters already are consecutive rows of one storage (e.g. a second compile of the same model), ``W`` is
a view of that storage and nothing is copied. Known limit, as with Inductor's freezing: the compiled graph holds
``W``, so in-place updates of the parameters (``load_state_dict``, ``copy_``) are seen, but rebinding one
(``param.data = t``, a new ``nn.Parameter``) is not, and Dynamo does not recompile for it.

``W`` enters the graph as a buffer of the GraphModule read by a ``get_attr`` node. AOTAutograd (under
Inductor's ``compile_fx``) lifts buffers to inputs and requires a Dynamo source for each in
``gm._param_name_to_source``; the pass adds a ``ConstantSource`` there (on a copy of the dict, which Dynamo owns).
The replaced parameters stay graph inputs, now unused. AOTAutograd checks each real input against Dynamo's record
of it, whose storage offset (0) a re-pointed parameter no longer has, so the pass swaps those entries of
``example_inputs`` for the fake values Dynamo traced (the backend must hand this list to the inner compiler). Dynamo's
guards do not cover a parameter's storage offset or its aliasing with other parameters, so the re-pointed parameters
cause no recompile (tested with torch 2.13; were one to happen, it would find the parameters already stacked).

The narrowed outputs are not contiguous. Users that merely read them are unaffected; a user that needs the old
layout (a ``view`` merging the last dim, say) is detected by re-deriving the fake values of every node that still
aliases the output, and that output then gets a ``.contiguous()`` copy. Re-deriving fake values through symbolic
shapes is slow (seconds for 32 layers), so it runs once per distinct user subgraph (``_signature``: every layer of
a model has the same one). The other layers' aliasing users keep their trace-time fake values, whose strides are
those of the unfused output: nothing downstream reads them (AOTAutograd re-traces the graph from its inputs).
"""
import contextlib
import itertools
import logging
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import is_fake

from graph_passes.fx_utils import arg, fake, fill_pending_fakes, finish_pass, is_op, is_parameter, op_name, uncached

logger = logging.getLogger(__name__)

CONSTANT_PREFIX = "cinfer_fused_projection"

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.setitem}
_COPIED_META = ("nn_module_stack", "source_fn_stack", "stack_trace")


@dataclass
class Projection:
    node: fx.Node            # linear(x, weight, bias) -> [..., out_features]
    weight: Tensor           # the real parameter, [out_features, in_features]
    bias: Tensor | None      # the real parameter, [out_features]

    def key(self) -> tuple:
        """Projections of one input fuse when these agree."""
        bias_dtype = None if self.bias is None else self.bias.dtype
        return self.weight.dtype, self.weight.device, self.weight.shape[1], self.bias is None, bias_dtype


def _real_values(gm: fx.GraphModule, example_inputs: list | None) -> dict[fx.Node, object]:
    """Graph node -> its runtime value: placeholders by position in ``example_inputs``, ``get_attr`` attributes."""
    values: dict[fx.Node, object] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is None:
        logger.debug("fuse_projections: no example inputs, so only get_attr weights can be fused")
    elif len(example_inputs) != len(placeholders):
        logger.debug("fuse_projections: %d example inputs for %d placeholders; placeholder weights are skipped",
                     len(example_inputs), len(placeholders))
    else:
        values.update(zip(placeholders, example_inputs))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            try:
                for part in node.target.split("."):
                    value = getattr(value, part)
            except AttributeError:
                continue
            values[node] = value
    return values


def _uses(gm: fx.GraphModule, values: dict[fx.Node, object]) -> dict[int, int]:
    """id(real tensor) -> how many nodes read it (through any of the nodes standing for it)."""
    uses: dict[int, int] = {}
    for node in gm.graph.nodes:
        for tensor in {id(values[n]) for n in node.all_input_nodes if n in values}:
            uses[tensor] = uses.get(tensor, 0) + 1
    return uses


def _is_real(value) -> bool:
    return (type(value) in (Tensor, torch.nn.Parameter) and not is_fake(value)
            and value.device.type != "meta")


def _parameter(node, values, uses, dim: int, what: str, linear: fx.Node) -> Tensor | None:
    """The real tensor behind ``node`` if it can become rows of a fused constant, else None (reason logged)."""
    if not is_parameter(node):
        logger.debug("fuse_projections: %s: %s %s is not a module parameter", linear.name, what, node)
        return None
    value = values.get(node)
    if not _is_real(value):
        logger.debug("fuse_projections: %s: %s %s has no real value (%s)", linear.name, what, node.name,
                     type(value).__name__)
        return None
    node_val = fake(node)
    if (value.dim() != dim or not value.is_contiguous() or node_val is None or node_val.dtype != value.dtype
            or tuple(node_val.shape) != tuple(value.shape)):
        logger.debug("fuse_projections: %s: %s %s is not a contiguous %d-D tensor matching its graph value",
                     linear.name, what, node.name, dim)
        return None
    if uses.get(id(value), 0) != 1:
        logger.debug("fuse_projections: %s: %s %s is also read elsewhere in the graph", linear.name, what, node.name)
        return None
    return value


def _projection(node: fx.Node, values, uses) -> Projection | None:
    """``node`` as a fusable projection, or None."""
    x, weight_node, bias_node = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    x_val, out_val = fake(x), fake(node)
    if x_val is None or out_val is None or not isinstance(weight_node, fx.Node):
        return None
    if out_val.requires_grad:
        logger.debug("fuse_projections: %s needs grad; a constant weight would cut the parameter off", node.name)
        return None
    weight = _parameter(weight_node, values, uses, 2, "weight", node)
    if weight is None:
        return None
    if not (x_val.dtype == out_val.dtype == weight.dtype and x_val.device == weight.device):
        logger.debug("fuse_projections: %s: input %s, weight %s, output %s (autocast or mixed dtypes)", node.name,
                     x_val.dtype, weight.dtype, out_val.dtype)
        return None
    bias = None
    if bias_node is not None:
        bias = _parameter(bias_node, values, uses, 1, "bias", node)
        if bias is None or bias.shape[0] != weight.shape[0] or bias.device != weight.device:
            return None
    return Projection(node, weight, bias)


def _may_mutate(node: fx.Node) -> bool:
    """Conservative: could ``node`` write to a tensor (an in-place method / operator, a mutable op, ``out=``)?"""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        return True
    if node.op != "call_function":
        return False
    target = node.target
    if target in _INPLACE_OPERATORS or "out" in node.kwargs:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if isinstance(target, torch._ops.OpOverloadPacket):
        return any(getattr(target, name)._schema.is_mutable for name in target.overloads())
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def _mutation_between(first: fx.Node, last: fx.Node) -> fx.Node | None:
    node = first.next
    while node is not last:
        if _may_mutate(node):
            return node
        node = node.next
    return None


def _consecutive_rows(parts: list[Tensor]) -> bool:
    """True when ``parts`` are consecutive row blocks of one storage, in order (already fused once)."""
    storage = parts[0].untyped_storage().data_ptr()
    for a, b in itertools.pairwise(parts):
        if (b.untyped_storage().data_ptr() != storage
                or b.storage_offset() != a.storage_offset() + a.numel()):
            return False
    return True


def stacked_parameters(parts: list[Tensor]) -> tuple[Tensor, bool]:
    """One contiguous tensor ``[sum(rows), *parts[0].shape[1:]]`` whose consecutive rows are ``parts``, with every
    part's ``.data`` a view of it afterwards; and whether the parts were re-pointed. Reuses the storage when the
    parts already lie so (nothing copied, nothing re-pointed); else copies once."""
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    # not an inference tensor even if compiled under inference_mode: the parameters must stay usable outside it
    with torch.inference_mode(False), torch.no_grad():
        if _consecutive_rows(parts):
            return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset()), False
        stacked = torch.cat([p.detach() for p in parts])
        start = 0
        for p in parts:
            p.data = stacked[start:start + p.shape[0]]
            start += p.shape[0]
    return stacked, True


def _register_constant(gm: fx.GraphModule, tensor: Tensor) -> str:
    name = next(f"{CONSTANT_PREFIX}_{i}" for i in itertools.count() if not hasattr(gm, f"{CONSTANT_PREFIX}_{i}"))
    # Persistent: AOTAutograd's cache key pickles the module's set of non-persistent buffer names, whose order
    # changes with Python's per-process string hashing, so every new process would miss that cache.
    gm.register_buffer(name, tensor, persistent=True)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        gm._param_name_to_source = {**sources, name: ConstantSource(name)}
    return name


def _common_module_stack(nodes: list[fx.Node]) -> dict:
    """The modules all ``nodes`` were called from (e.g. a layer's ``self_attn`` for q/k/v)."""
    stacks = [list((n.meta.get("nn_module_stack") or {}).items()) for n in nodes]
    common = []
    for entries in zip(*stacks):
        if any(e != entries[0] for e in entries[1:]):
            break
        common.append(entries[0])
    return dict(common)


def _fake_result(node: fx.Node):
    """``node``'s target evaluated on its inputs' fake values (raises if that fails); call under the fake mode."""
    def value(a):
        if not isinstance(a, fx.Node):
            return a
        return a.meta["example_value"] if "example_value" in a.meta else a.meta.get("val")

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    raise ValueError(f"cannot evaluate a {node.op} node")


def _record(node: fx.Node, value, with_val: bool) -> None:
    """Store a fake value where the graph keeps them: Dynamo's ``example_value``, plus ``val`` if the graph has it."""
    node.meta["example_value"] = value
    if with_val:
        node.meta["val"] = value


def _propagate(node: fx.Node, fake_mode, with_val: bool) -> None:
    """Fill the fake value of a node the pass inserted. Under the Python dispatcher, as Dynamo traces: without it,
    C++ composite kernels (``linear`` -> ``matmul`` in torch 2.11) call ``numel()`` on symbolic sizes and fail.
    A linear keeps the fake-tensor cache (its decomposition's reshapes cost more afresh), a narrow or a copy skips
    it (``fx_utils.uncached``)."""
    with fake_mode, enable_python_dispatcher(), (
            contextlib.nullcontext() if is_op(node, "linear") else uncached(fake_mode)):
        _record(node, _fake_result(node), with_val)


def _aliases(result, base: Tensor) -> bool:
    leaves = torch.utils._pytree.tree_leaves(result)
    return any(isinstance(t, Tensor) and torch._C._is_alias_of(t, base) for t in leaves)


def _strided_view_is_fine(narrow: fx.Node) -> bool:
    """Re-derive, in graph order, the fake value of every node that aliases ``narrow`` (views of views...). False
    if one fails: some user relied on the contiguous layout of the unfused output. Fake values are updated."""
    base = fake(narrow)
    saved: dict[fx.Node, object] = {}
    pending = set(narrow.users)
    node = narrow.next
    try:
        with base.fake_mode, enable_python_dispatcher():
            while pending and node.op != "output":
                if node in pending:
                    pending.discard(node)
                    result = _fake_result(node)
                    if _aliases(result, base):
                        saved[node] = {k: node.meta[k] for k in ("example_value", "val") if k in node.meta}
                        _record(node, result, "val" in node.meta)
                        pending.update(node.users)
                node = node.next
    except Exception as e:  # noqa: BLE001  (any failure means: give the user a contiguous tensor, which is safe)
        logger.debug("fuse_projections: %s's user %s needs a contiguous tensor (%s: %s)", narrow.name, node.name,
                     type(e).__name__, e)
        for n, old in saved.items():
            n.meta.update(old)
        return False
    return True


_SIGNATURE_DEPTH = 6


def _layout(sizes) -> tuple:
    """Sizes or strides with every symbolic entry as "sym": another layer's inputs (its KV cache, say) carry
    symbols of their own, which do not change how the narrow's users treat its layout."""
    return tuple(int(v) if isinstance(v, int) or not isinstance(v, torch.SymInt) else
                 (int(v) if v.node.is_constant() else "sym") for v in sizes)


# Ops whose result may alias their input (canonical names, graph_passes.fx_utils.op_name): the layout check follows
# these; any other user only reads the tensor.
_VIEW_OPS = {"reshape", "transpose", "getitem", "narrow", "permute", "unsqueeze", "squeeze", "expand", "select",
             "split", "chunk", "unbind", "flatten", "unflatten", "t", "view_as", "as_strided", "contiguous", "to",
             "type_as", "float", "half", "bfloat16", "movedim", "swapdims", "diagonal", "unfold", "detach"}


def _signature(narrow: fx.Node) -> tuple | None:
    """What ``_strided_view_is_fine`` depends on, as a hashable structure: the narrow's fake layout and the
    subgraph of its users (targets, constant arguments, other inputs' shapes), followed through view-like ops to
    ``_SIGNATURE_DEPTH`` levels. Every layer of a model gives the same signature, so the check runs once per
    distinct one. None when a view chain is deeper than that (no memo: the check runs)."""
    truncated = False

    def describe(value, inside: dict[fx.Node, int]):
        if isinstance(value, fx.Node):
            if value in inside:
                return ("@", inside[value])
            val = fake(value)
            # Not their strides: a layer whose check was memoized keeps trace-time strides on its other nodes.
            return ("node", None if val is None else (_layout(val.shape), str(val.dtype)))
        if isinstance(value, list | tuple):
            return tuple(describe(v, inside) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, describe(v, inside)) for k, v in value.items()))
        return repr(value)

    def users(node: fx.Node, depth: int, inside: dict[fx.Node, int]):
        nonlocal truncated
        out = []
        for user in node.users:
            scope = {**inside, user: len(inside)}
            follow = op_name(user) in _VIEW_OPS
            if follow and depth + 1 == _SIGNATURE_DEPTH:
                truncated = True
            below = users(user, depth + 1, scope) if follow and not truncated else ()
            out.append((user.op, str(user.target), describe(user.args, inside), describe(user.kwargs, inside), below))
        return tuple(out)

    base = fake(narrow)
    sig = (str(base.shape), str(base.stride()), str(base.dtype), users(narrow, 0, {narrow: 0}))
    return None if truncated else sig


def _trace_time_inputs(example_inputs: list | None, nodes: list[fx.Node]) -> None:
    """Put the trace-time fake values of re-pointed parameter placeholders into ``example_inputs``: the inner
    compiler (AOTAutograd) fakifies real inputs against Dynamo's record of them, which says storage offset 0."""
    if example_inputs is None:
        return
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        return
    positions = {node: i for i, node in enumerate(placeholders[0].graph.find_nodes(op="placeholder"))}
    for node in placeholders:
        example_inputs[positions[node]] = node.meta["example_value"]


def _linear_key(fused: fx.Node) -> tuple:
    """What the fake value of ``linear(x, W, b)`` depends on: its operands' layouts (sizes and strides as printed,
    so symbols by name) and the grad mode."""
    def layout(t):
        return None if t is None else (str(t.shape), str(t.stride()), str(t.storage_offset()), t.dtype, t.device,
                                       t.requires_grad)
    return tuple(layout(fake(a)) for a in fused.args) + (torch.is_grad_enabled(),)


def _propagate_linear(fused: fx.Node, fake_mode, with_val: bool, outputs: dict[tuple, Tensor]) -> None:
    """``_propagate`` for a fused linear, evaluated once per operand layout (``outputs``: the first result of each):
    every layer's qkv (and gate/up) GEMM reads the same shapes, and ``linear`` on symbolic sizes (its ``matmul``
    decomposition) costs several times what allocating its output does. A linear's output is a new tensor, not a
    view, so the others get a fresh one of the first one's sizes and strides."""
    key = _linear_key(fused)
    first = outputs.get(key)
    if first is None:
        _propagate(fused, fake_mode, with_val)
        value = fake(fused)
        if value is not None and value.storage_offset() == 0 and not value._is_view():
            outputs[key] = value
        return
    with fake_mode:
        value = torch.empty_strided(first.shape, first.stride(), dtype=first.dtype, device=first.device,
                                    requires_grad=first.requires_grad)
    _record(fused, value, with_val)


def _fuse(gm: fx.GraphModule, group: list[Projection], example_inputs: list | None,
          verdicts: dict[tuple, bool], linear_outputs: dict[tuple, Tensor]) -> int:
    """Rewrite one group; returns the number of ``.contiguous()`` copies its outputs needed. ``verdicts``: the
    layout checks already made, by ``_signature``; ``linear_outputs``: ``_propagate_linear``'s (both shared by the
    groups of one graph)."""
    graph = gm.graph
    first = group[0].node
    x = first.args[0]
    fake_mode = fake(x).fake_mode
    with_val = "val" in first.meta
    weight, moved = stacked_parameters([p.weight for p in group])
    if moved:
        _trace_time_inputs(example_inputs, [p.node.args[1] for p in group])
    bias = None
    if group[0].bias is not None:
        bias, moved = stacked_parameters([p.bias for p in group])
        if moved:
            _trace_time_inputs(example_inputs, [arg(p.node, 2, "bias") for p in group])

    with graph.inserting_before(first):
        weight_node = graph.get_attr(_register_constant(gm, weight))
        _record(weight_node, fake_mode.from_tensor(weight, static_shapes=True), with_val)
        bias_node = None
        if bias is not None:
            bias_node = graph.get_attr(_register_constant(gm, bias))
            _record(bias_node, fake_mode.from_tensor(bias, static_shapes=True), with_val)
        fused = graph.call_function(first.target, (x, weight_node, bias_node))
        fused.meta["nn_module_stack"] = _common_module_stack([p.node for p in group])
        fused.meta["stack_trace"] = first.meta.get("stack_trace")
        _propagate_linear(fused, fake_mode, with_val, linear_outputs)
        narrows = []
        start = 0
        for p in group:
            out_features = p.weight.shape[0]
            narrow = graph.call_function(torch.narrow, (fused, -1, start, out_features))
            start += out_features
            narrow.meta.update({k: v for k, v in p.node.meta.items() if k in _COPIED_META})
            _propagate(narrow, fake_mode, with_val)
            narrows.append(narrow)

    copies = 0
    for p, narrow in zip(group, narrows):
        p.node.replace_all_uses_with(narrow)
        graph.erase_node(p.node)
        signature = _signature(narrow)
        fine = verdicts.get(signature) if signature is not None else None
        if fine is None:
            fine = _strided_view_is_fine(narrow)
            if signature is not None:
                verdicts[signature] = fine
        if not fine:
            with graph.inserting_after(narrow):
                copy = graph.call_method("contiguous", (narrow,))
            copy.meta.update({k: v for k, v in narrow.meta.items() if k in _COPIED_META})
            _propagate(copy, fake_mode, with_val)
            narrow.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
            copies += 1
    return copies


def _groups(gm: fx.GraphModule, values, uses) -> list[list[Projection]]:
    """Fusable groups, each in graph order."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_op(node, "linear") and node.args and isinstance(node.args[0], fx.Node):
            by_input.setdefault(node.args[0], []).append(node)
    groups = []
    for x, linears in by_input.items():
        if len(linears) < 2:
            continue
        by_key: dict[tuple, list[Projection]] = {}
        for node in linears:
            projection = _projection(node, values, uses)
            if projection is not None:
                by_key.setdefault(projection.key(), []).append(projection)
        for key, group in by_key.items():
            if len(group) < 2:
                continue
            mutation = _mutation_between(group[0].node, group[-1].node)
            if mutation is not None:
                logger.debug("fuse_projections: %d projections of %s not fused: %s may mutate in between",
                             len(group), x.name, mutation.name)
                continue
            groups.append(group)
        if sum(len(g) for g in by_key.values()) < len(linears) or len(by_key) > 1:
            logger.debug("fuse_projections: %s feeds %d linears, fusable as %s", x.name, len(linears),
                         [len(g) for g in by_key.values()])
    return groups


def fuse_projections(gm: fx.GraphModule, example_inputs: list | None = None) -> int:
    """Fuse each group of >= 2 linear projections of one input into one linear + narrows (see the module
    docstring); returns the number of groups fused. ``example_inputs``: the backend's, one per placeholder (the
    real parameters). Re-points the fused parameters' ``.data`` into the new constants, and replaces their entries
    in ``example_inputs`` (in place) by the fake values Dynamo traced them with: hand the inner compiler this list.
    The placeholders stay in the graph, unused; at run time they receive the re-pointed parameters."""
    # Fake values earlier passes deferred: every node left now survives this pass, and the layout check below
    # re-derives (and may restore) values of nodes that must already have them.
    fill_pending_fakes(gm)
    values = _real_values(gm, example_inputs)
    uses = _uses(gm, values)
    groups = _groups(gm, values, uses)
    verdicts: dict[tuple, bool] = {}
    linear_outputs: dict[tuple, Tensor] = {}
    copies = sum(_fuse(gm, group, example_inputs, verdicts, linear_outputs) for group in groups)
    if groups:
        gm.graph.eliminate_dead_code()
        logger.debug("fuse_projections: %d groups (%s projections), %d outputs copied to contiguous", len(groups),
                     sum(len(g) for g in groups), copies)
    finish_pass(gm, bool(groups))
    return len(groups)
