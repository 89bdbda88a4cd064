"""Norm + projection folding: a ``cinfer.rms_norm`` / ``cinfer.fused_add_rms_norm`` whose normalised output feeds
exactly one bias-free ``cinfer.linear`` -> ``cinfer.rms_norm_linear`` / ``cinfer.fused_add_rms_norm_linear``.

Runs last, after the linear pass: in an HF Llama decoder (q/k/v and gate/up stacked by then) every norm has that
shape -- the input norm feeds the fused q/k/v projection, the post-attention norm the fused gate/up projection --
so a decode step launches one kernel for each norm + projection pair instead of two (see ``cinfer_ops.norm_linear``).
The rewrite::

    n = cinfer.rms_norm(x, w_norm, eps);  y = cinfer.linear(n, W, None)
 -> y = cinfer.rms_norm_linear(x, w_norm, eps, W)

    n, r = cinfer.fused_add_rms_norm(x, res, w_norm, eps);  y = cinfer.linear(n, W, None)
 -> y, r = cinfer.fused_add_rms_norm_linear(x, res, w_norm, eps, W)

It fires when the normalised output has no other user, the linear reads it as ``x`` and has no bias, and the
normalised output, the linear's output and its weight share one dtype. ``new_residual`` (``r``) may have any users;
they read the new op's second output.

The final norm feeds ``lm_head`` through a row selection (HF's ``hidden_states[:, logits_to_keep, :]``; in a paged
graph the rows of ``logits_indices``). A norm works row by row, so the selection is moved onto its inputs:
``linear(norm(x)[idx])`` -> ``rms_norm_linear(x[idx], ...)``, which normalises only the selected rows. That is exact
when ``idx`` leaves the last dim whole (basic slices, ints and integer index tensors over the leading dims; no
``None``, ``Ellipsis`` or boolean masks), and for ``fused_add_rms_norm`` only when ``new_residual`` is unused (it
would be needed for every row).

The new nodes take the norm's place in the graph (where its inputs and ``new_residual``'s users already are); a
``get_attr`` weight defined later (the projection pass's stacked constants) is moved up to them. A weight or index
computed after the norm leaves the site alone.
"""
import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from graph_passes.fx_utils import arg, fake, is_op, only_user, same_size, set_fake

logger = logging.getLogger(__name__)

_COPIED_META = ("nn_module_stack", "source_fn_stack", "stack_trace")


@dataclass
class _Site:
    linear: fx.Node                   # cinfer.linear(x, weight, None)
    weight: fx.Node
    norm: fx.Node                     # cinfer.rms_norm or cinfer.fused_add_rms_norm
    normed: fx.Node                   # the norm's output: the norm itself, or getitem(norm, 0)
    new_residual: fx.Node | None      # getitem(norm, 1) of a fused_add_rms_norm, if present
    gather: fx.Node | None            # normed[index] between the norm and the linear, if any
    index: object = None


def _weight_dtype(gm: fx.GraphModule, node: fx.Node) -> torch.dtype | None:
    value = fake(node)
    if value is None and node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
    return value.dtype if isinstance(value, torch.Tensor) else None


def _row_index(gather: fx.Node, normed: fx.Node):
    """The index of ``gather = normed[index]`` when it selects along leading dims only (the last dim stays whole
    and stays last), else None."""
    if len(gather.args) != 2 or gather.kwargs:
        return None
    index = gather.args[1]
    entries = index if isinstance(index, tuple) else (index,)
    src, out = fake(normed), fake(gather)
    if src is None or out is None or len(entries) > src.dim():
        return None
    for entry in entries:
        if isinstance(entry, fx.Node):
            value = entry.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                if value.dtype not in (torch.int64, torch.int32):
                    return None  # a boolean mask can span several dims
            elif not isinstance(value, int | torch.SymInt) or isinstance(value, bool):
                return None
        elif isinstance(entry, bool) or not isinstance(entry, int | slice):
            return None  # None / Ellipsis shift the dims
    if len(entries) == src.dim() and entries[-1] != slice(None):
        return None
    if out.dim() < 1 or not same_size(out.shape[-1], src.shape[-1]):
        return None
    return index


def _norm_of(normed: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(norm, new_residual getitem or None) when ``normed`` is the normalised output of one of the norm ops."""
    if normed.target is torch.ops.cinfer.rms_norm.default:
        return normed, None
    if not (is_op(normed, "getitem") and normed.args[1] == 0
            and getattr(normed.args[0], "target", None) is torch.ops.cinfer.fused_add_rms_norm.default):
        return None
    norm = normed.args[0]
    outputs = {0: [], 1: []}
    for user in norm.users:
        if not is_op(user, "getitem") or user.args[1] not in outputs:
            return None
        outputs[user.args[1]].append(user)
    if outputs[0] != [normed] or len(outputs[1]) > 1:
        return None
    return norm, (outputs[1][0] if outputs[1] else None)


def _match(gm: fx.GraphModule, linear: fx.Node) -> _Site | None:
    if len(linear.args) < 2 or arg(linear, 2, "bias") is not None:
        return None
    x, weight = linear.args[0], arg(linear, 1, "weight")
    if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node) or only_user(x) is not linear:
        return None
    if x is weight:
        return None
    gather, index, normed = None, None, x
    found = _norm_of(x)
    if found is None and is_op(x, "getitem") and isinstance(x.args[0], fx.Node):
        gather, normed = x, x.args[0]
        if only_user(normed) is not gather:
            return None
        index = _row_index(gather, normed)
        found = _norm_of(normed) if index is not None else None
    if found is None:
        return None
    norm, new_residual = found
    if gather is not None and new_residual is not None and new_residual.users:
        logger.debug("norm_linear: %s: new_residual is used, so the row selection cannot move", norm.name)
        return None
    normed_val, out_val = fake(normed), fake(linear)
    if normed_val is None or out_val is None or normed_val.dtype != out_val.dtype:
        return None
    if _weight_dtype(gm, weight) != out_val.dtype:
        return None
    return _Site(linear, weight, norm, normed, new_residual, gather, index)


def _hoist_inputs(site: _Site, order: dict[fx.Node, float]) -> bool:
    """Make the weight and the index nodes available before the norm (moving get_attrs); False if they cannot be."""
    extra = [site.weight]
    if site.gather is not None:
        extra += [n for n in site.gather.all_input_nodes if n is not site.normed]
    for node in extra:
        if order[node] < order[site.norm]:
            continue
        if node.op != "get_attr":
            logger.debug("norm_linear: %s is computed after %s", node.name, site.norm.name)
            return False
    for node in extra:
        if order[node] > order[site.norm]:
            site.norm.prepend(node)  # a get_attr has no inputs: it may sit anywhere before its users
            order[node] = order[site.norm] - 0.5
    return True


def _rewrite(gm: fx.GraphModule, site: _Site) -> None:
    graph = gm.graph
    fused = site.norm.target is torch.ops.cinfer.fused_add_rms_norm.default
    x, *rest = site.norm.args
    residual = rest[0] if fused else None
    norm_weight, eps = rest[-2:]
    new_nodes = []
    with graph.inserting_before(site.norm):
        if site.gather is not None:
            x = graph.call_function(operator.getitem, (x, site.index))
            new_nodes.append(x)
            if fused:
                residual = graph.call_function(operator.getitem, (residual, site.index))
                new_nodes.append(residual)
        if fused:
            op = graph.call_function(torch.ops.cinfer.fused_add_rms_norm_linear.default,
                                     (x, residual, norm_weight, eps, site.weight))
            out = graph.call_function(operator.getitem, (op, 0))
            new_residual = graph.call_function(operator.getitem, (op, 1))
            new_nodes += [op, out, new_residual]
        else:
            op = out = graph.call_function(torch.ops.cinfer.rms_norm_linear.default, (x, norm_weight, eps, site.weight))
            new_nodes.append(op)
    for node in new_nodes:
        node.meta.update({k: v for k, v in site.linear.meta.items() if k in _COPIED_META})
        set_fake(node)
    site.linear.replace_all_uses_with(out)
    if site.new_residual is not None:
        site.new_residual.replace_all_uses_with(new_residual)
    for node in (site.linear, site.gather, site.normed if fused else None, site.new_residual, site.norm):
        if node is not None:
            graph.erase_node(node)


def fold_norms_into_linears(gm: fx.GraphModule) -> int:
    """Fold every eligible norm into the ``cinfer.linear`` that reads it; returns the number of sites rewritten."""
    order: dict[fx.Node, float] = {node: i for i, node in enumerate(gm.graph.nodes)}
    count = 0
    for linear in [n for n in gm.graph.nodes if n.target is torch.ops.cinfer.linear.default]:
        site = _match(gm, linear)
        if site is None or not _hoist_inputs(site, order):
            continue
        _rewrite(gm, site)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
