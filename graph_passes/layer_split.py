"""Compile a rewritten step graph one decoder layer at a time, each distinct layer once.

A Llama-family forward is the same decoder layer N times over. Compiled as one graph, Inductor (and AOTAutograd's
tracing before it) pays for every copy: that was most of a cold start (20-36 s of Inductor for the 32 layers of
Llama-3-8B on an H100 host), and its cache lookups most of a warm start's backend time.

``compile_by_layer`` splits the graph the passes produced into pieces: the prologue (embedding, the rotary tables),
one piece per decoder layer, and the epilogue (final norm, ``lm_head``). A node's layer comes from Dynamo's
``nn_module_stack`` (``...layers.<i>...``); nodes of no layer go with the piece around them. Pieces whose graphs are
identical up to node names, over inputs of the same dtype, device, (symbolic) shape, stride and storage offset,
share one compiled function: each distinct piece is compiled once and called with each layer's own inputs (its
weights, its KV caches, the previous piece's outputs). Weights are inputs of a piece, never constants baked into
it (``get_attr`` tensors, such as the stacked projection weights, become piece inputs), so this is exact.

For a Llama model that is four compiles whatever the depth: the prologue, layer 0 (which starts with a plain norm),
layers 1 to N-1 (each starts with the residual add fused into its norm), and the epilogue. What runs is the same
kernels as the whole-graph compile, since every layer-crossing value was already a custom op's input or output
(the residual add lives in ``cinfer.fused_add_rms_norm``); outside CUDA graphs a step makes one Python call per piece.

``CINFER_SPLIT_LAYERS=0`` (or ``layer_split.ENABLED = False``) compiles the whole graph at once instead, as does a
graph in which no node belongs to a numbered layer. ``layer_replication`` builds on the split: Dynamo traces two
layers, and the others run layer 1's piece.
"""
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("CINFER_SPLIT_LAYERS", "1") != "0"

_LAYER = re.compile(r"\.layers(?:\.(\d+)(?=\.|$)|\[(\d+)\])")  # ".layers.3" (Dynamo's spelling) or ".layers[3]"


@dataclass
class SplitReport:
    """What ``compile_by_layer`` did: ``pieces`` submodules, of which ``compiled`` were compiled (the rest reused
    one of those); ``piece_compiles`` names the pieces compiled, in order."""
    pieces: int = 0
    compiled: int = 0
    piece_compiles: list[str] = field(default_factory=list)


def node_layer(node: fx.Node) -> int | None:
    """The index of the decoder layer ``node`` was traced in (its innermost module path holds ``.layers.<i>``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    match = _LAYER.search(str(path))
    return int(match.group(1) or match.group(2)) if match else None


def layer_partitions(gm: fx.GraphModule) -> dict[fx.Node, int] | None:
    """Piece number of every computing node: 0 the prologue, ``i + 1`` layer ``i``, then the epilogue; None when no
    node belongs to a layer. A node of no layer joins the piece of the node before it (the prologue before the
    first layer, the epilogue after the last). Numbers never decrease along the graph's edges, so the pieces run in
    order and each reads only earlier pieces' outputs."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    layers = {n: layer for n in nodes if (layer := node_layer(n)) is not None}
    if not layers:
        return None
    last_layer_node = max(i for i, n in enumerate(nodes) if n in layers)
    epilogue = max(layers.values()) + 2
    parts: dict[fx.Node, int] = {}
    current = 0
    for i, node in enumerate(nodes):
        if node in layers:
            current = layers[node] + 1
        elif i > last_layer_node:
            current = epilogue
        inputs = [parts[a] for a in node.all_input_nodes if a in parts]
        parts[node] = max([current, *inputs])
    return parts


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', None) or str(target)}"


class _SymbolNames:
    """Renames a piece's size symbols in order of first appearance, so that two pieces whose inputs differ only in
    which symbols they carry get the same key. Each layer's KV caches have a block-count symbol of their own (all
    caches are the same size, see ``PagedModel.set_caches``), so without this no two layers would match."""

    def __init__(self):
        self.names: dict = {}

    def __call__(self, value) -> str:
        expr = value.node.expr if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool) else value
        if not hasattr(expr, "free_symbols"):
            return repr(expr)
        for symbol in sorted(expr.free_symbols - self.names.keys(), key=str):
            self.names[symbol] = type(symbol)(f"c{len(self.names)}", **symbol.assumptions0)
        return str(expr.xreplace(self.names))


def _describe(value, names: _SymbolNames) -> tuple:
    """What a compiled piece may depend on in one of its inputs, its size symbols renamed by ``names``."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), str(value.device), tuple(map(names, value.shape)),
                tuple(map(names, value.stride())), names(value.storage_offset()), value.requires_grad)
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ("sym", type(value).__name__, names(value))
    return ("const", type(value).__name__, repr(value))


def piece_key(piece: fx.GraphModule, example_args: list) -> str:
    """A key equal for two pieces exactly when one compiled function serves both: the same operations on the same
    operands in the same order, over inputs described alike, up to the names of nodes and size symbols."""
    index: dict[fx.Node, int] = {}
    names = _SymbolNames()
    items = []
    inputs = iter(example_args)
    for i, node in enumerate(piece.graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            items.append(("input", _describe(next(inputs), names)))
            continue
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("node", index[n]))
        items.append((node.op, _target_name(node.target), repr(args)))
    return repr(items)


def _example_args(piece: fx.GraphModule) -> list:
    """Fake values of a piece's inputs: ``split_module`` copies each producing node's meta onto its placeholder, and
    the passes leave a fake value on every node (``fx_utils.passes_deferred``)."""
    args = []
    for node in piece.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if value is None:
            raise RuntimeError(f"layer split: no example value for the input {node.target!r} of a piece")
        args.append(value)
    return args


def compile_by_layer(gm: fx.GraphModule, example_inputs: list,
                     compile_piece: Callable[[fx.GraphModule, list], Callable],
                     replication=None) -> tuple[Callable, SplitReport]:
    """Compile ``gm`` (a graph the passes rewrote; its nodes carry Dynamo's fake values) piece by piece with
    ``compile_piece(piece, fake_example_args)``, once per distinct piece. Returns the callable to run in place of
    ``gm`` and what was compiled. Falls back to ``compile_piece(gm, example_inputs)`` when disabled or when the
    graph has no layers. ``replication``: a ``layer_replication.LayerReplication`` when ``gm`` was traced over the
    first layers of a model whose other layers run layer 1's piece (see there)."""
    report = SplitReport()
    parts = layer_partitions(gm) if ENABLED else None
    if parts is None and replication is not None:
        # the graph holds only the traced layers: compiled whole, it would skip the others
        raise RuntimeError("layer split: a graph traced over some of the layers must be split (ENABLED changed "
                           "between compile_model and its first call?)")
    if parts is None:
        report.pieces = report.compiled = 1
        report.piece_compiles.append("whole graph")
        return compile_piece(gm, example_inputs), report
    split = split_module(gm, None, lambda node: parts[node], keep_original_order=True)
    compiled: dict[str, Callable] = {}
    for node in split.graph.find_nodes(op="call_module"):
        piece = getattr(split, node.target)
        args = _example_args(piece)
        key = piece_key(piece, args)
        if key not in compiled:
            compiled[key] = compile_piece(piece, args)
            report.piece_compiles.append(node.target)
        # The generated forward calls ``self.<target>(...)``: an instance attribute shadows the submodule.
        split.__dict__[node.target] = compiled[key]
        report.pieces += 1
    report.compiled = len(compiled)
    if replication is not None:
        report.pieces += replication.expand(split, example_inputs)
    logger.info("layer split: %d pieces, %d compiled (%s)", report.pieces, report.compiled,
                ", ".join(report.piece_compiles))
    return split, report
