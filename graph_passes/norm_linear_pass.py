"""Norm split pass: each RMSNorm between two projections is split into their epilogue and their K loop's end.

After the linear and gated-MLP passes an HF decoder layer reads, twice (after ``o_proj`` and after ``down_proj``):

    y = cinfer.linear(a, W1, b1)
    normed, h = cinfer.fused_add_rms_norm(y, residual, g, eps)
    z = cinfer.linear(normed, W2, b2)            # or cinfer.linear_silu_mul; one or more such projections

which becomes (``cinfer_ops.norm_linear``)

    scaled, h, sumsq = cinfer.linear_add_rms_stats(a, W1, b1, residual, g, eps)
    z = cinfer.rms_stats_linear(scaled, sumsq, eps, W2, b2)    # or cinfer.rms_stats_linear_silu_mul

so a decode step launches no norm kernel after a projection. It fires only where that is the same computation:
``y`` is read by the norm alone, and every reader of ``normed`` is a projection taking it as its input, or picks
rows of it for projections (HF's ``hidden_states[:, logits_indices, :]`` between the final norm and ``lm_head``:
then the same rows of ``scaled`` and ``sumsq`` are picked). The first layer's norm (after the embedding) and
anything else keep their norm op. Like the other fusions this is an optimisation: nothing is raised.

The split moves a layer boundary: ``linear_add_rms_stats`` takes the norm's place, so the node that computes
layer i's ``down_proj`` is layer i + 1's (or the epilogue's, for the final norm) and reads layer i's weight;
``layer_split`` and ``layer_replication`` follow it (a layer's piece reads its predecessor's ``down_proj``). So
norms between layers are split all or none: if one of them cannot be (a final norm read by something other than
``lm_head``), only the norms within a layer are.
"""
import logging
import operator

import torch
from torch import fx

import cinfer_ops  # noqa: F401  (registers the ops)
from graph_passes.fx_utils import fake, finish_pass, set_fake
from graph_passes.layer_split import node_layer

logger = logging.getLogger(__name__)

# False: split_norms rewrites nothing (the benchmarks' cinfer_norms peer); read when a graph is compiled.
SPLIT_NORMS = True

_CONSUMERS = {torch.ops.cinfer.linear.default: torch.ops.cinfer.rms_stats_linear.default,
              torch.ops.cinfer.linear_silu_mul.default: torch.ops.cinfer.rms_stats_linear_silu_mul.default}


def _getitems(node: fx.Node) -> dict[int, fx.Node] | None:
    """The ``operator.getitem`` users of a tuple-valued node by index, or None if something else reads it."""
    items = {}
    for user in node.users:
        if user.target is not operator.getitem or not isinstance(user.args[1], int) or user.args[1] in items:
            return None
        items[user.args[1]] = user
    return items


def _row_index(node: fx.Node) -> tuple | None:
    """The index of ``node = value[index]`` if it picks rows only: slices and at most one 1-D index tensor, the
    last dim untouched (as HF's ``hidden_states[:, logits_indices, :]`` before ``lm_head``); else None. Reads only
    ``node``'s own fake value (traced), never its input's (the norm's, which this pass removes)."""
    if node.target is not operator.getitem or not isinstance(node.args[1], tuple):
        return None
    index = node.args[1]
    tensors = [i for i in index if isinstance(i, fx.Node)]
    if any(not isinstance(i, (slice, fx.Node)) for i in index) or len(tensors) > 1:
        return None
    if tensors and (fake(tensors[0]) is None or fake(tensors[0]).dim() != 1):
        return None
    out = fake(node)  # as many dims as its input: slices keep theirs and one 1-D index tensor its dim
    if out is None or len(index) > out.dim() or (len(index) == out.dim() and index[-1] != slice(None)):
        return None
    return index


def _projections(value: fx.Node) -> list[fx.Node] | None:
    """The projections reading ``value`` as their input, if nothing else reads it."""
    if not all(u.target in _CONSUMERS and u.args[0] is value and value not in u.args[1:] for u in value.users):
        return None
    return list(value.users)


def _match(norm: fx.Node) -> tuple | str:
    """(first projection, the norm's output items, [(row index or None, its projections)]), or why ``norm`` is
    not a site."""
    y = norm.args[0]
    if not isinstance(y, fx.Node) or y.target is not torch.ops.cinfer.linear.default:
        return "its input is not a cinfer.linear"
    if len(y.users) != 1:
        return f"{y.name} has other readers"
    items = _getitems(norm)
    if items is None or 0 not in items:
        return "its output is read other than by index"
    readers = []
    for user in items[0].users:
        index = _row_index(user)
        projections = _projections(user if index is not None else items[0])
        if projections is None:
            return f"{user.name} reads the normed value but is not a projection of it (or of some of its rows)"
        if index is None:
            readers.append((None, [user]))
        else:
            readers.append((user, projections))
    return y, items, readers


def _within_layer(norm: fx.Node) -> bool:
    """Whether ``norm`` and the projection before it were traced in one decoder layer (a post-attention norm),
    not in two (the next layer's input norm, the final norm)."""
    y = norm.args[0]
    layer = node_layer(norm)
    return layer is not None and isinstance(y, fx.Node) and node_layer(y) == layer


def split_norms(gm: fx.GraphModule, rejected: list[str] | None = None) -> int:
    """Rewrite each site of ``gm`` in place; returns how many. ``rejected`` collects why the other
    ``fused_add_rms_norm`` nodes were left alone."""
    if not SPLIT_NORMS:
        return 0
    count = 0
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.cinfer.fused_add_rms_norm.default]
    matches = {norm: _match(norm) for norm in norms}
    # A split norm between two layers moves their boundary; layer pieces stay alike (layer_replication runs layer
    # 1's piece for the later ones) only if every such norm moves it, so one that cannot be split keeps them all.
    between = [norm for norm in norms if not _within_layer(norm)]
    kept = [norm.name for norm in between if isinstance(matches[norm], str)]
    if kept:
        for norm in between:
            if not isinstance(matches[norm], str):
                matches[norm] = f"between layers, and {kept[0]} (between layers too) cannot be split"
    for norm in norms:
        match = matches[norm]
        if isinstance(match, str):
            logger.debug("norm split: %s: %s, skipped", norm.name, match)
            if rejected is not None:
                rejected.append(f"{norm.name}: {match}")
            continue
        y, items, readers = match
        _, residual, weight, eps = norm.args
        meta = {k: v for k, v in norm.meta.items() if k in ("nn_module_stack", "stack_trace")}
        with gm.graph.inserting_before(norm):
            stats = gm.graph.call_function(torch.ops.cinfer.linear_add_rms_stats.default,
                                            (*y.args, residual, weight, eps))
            parts = [gm.graph.call_function(operator.getitem, (stats, i)) for i in range(3)]
        for node in (stats, *parts):
            node.meta.update(meta)
            set_fake(node)
        scaled, new_residual, sumsq = parts
        for rows, consumers in readers:
            x, x_sumsq = scaled, sumsq
            if rows is not None:  # the same rows of both
                with gm.graph.inserting_before(rows):
                    x, x_sumsq = (gm.graph.call_function(operator.getitem, (value, rows.args[1]))
                                  for value in (scaled, sumsq))
                for node in (x, x_sumsq):
                    node.meta.update({k: v for k, v in rows.meta.items() if k in ("nn_module_stack", "stack_trace")})
                    set_fake(node)
            for consumer in consumers:
                _, w2, b2 = consumer.args
                with gm.graph.inserting_before(consumer):
                    fused = gm.graph.call_function(_CONSUMERS[consumer.target], (x, x_sumsq, eps, w2, b2))
                fused.meta.update(consumer.meta)  # the same value
                consumer.replace_all_uses_with(fused)
                gm.graph.erase_node(consumer)
            if rows is not None:
                gm.graph.erase_node(rows)
        if 1 in items:
            items[1].replace_all_uses_with(new_residual)
        for item in items.values():
            gm.graph.erase_node(item)
        gm.graph.erase_node(norm)
        gm.graph.erase_node(y)
        count += 1
    finish_pass(gm, count > 0)
    return count
