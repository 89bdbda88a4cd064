"""Trace two decoder layers, run all of them: Dynamo's tracing without the cost of N identical layers.

Once ``layer_split`` compiles each distinct layer once, what is left of a start-up is mostly Dynamo's bytecode
tracing of the model's Python, in proportion to the number of layers (7-11 s of a Llama-3-8B start-up on an H100
host, with warm compile caches most of the start-up).

When layers 1 to N-1 of a model are interchangeable (``replicable_layers``: the same classes, parameter shapes and
plain attributes, ``layer_idx`` aside, one layer type, and no module hooks), ``PagedModel`` lets Dynamo trace
``truncated_model``: a shallow copy of the model whose layer list holds layers 0 and 1 only (the user's model is not
touched; the copy shares its modules and parameters). The passes rewrite those two layers and ``layer_split``
compiles the pieces. ``LayerReplication.expand`` then adds, after layer 1's call, a call of layer 1's compiled
piece for each of layers 2 to N-1, with that layer's own parameters (its projections stacked as the passes
stacked layer 1's), its own KV caches and the previous layer's outputs, and feeds the last one to the epilogue.
The compiled step thus runs all N layers; Dynamo and the passes saw two.

Layer 0 is traced too because it differs (its first norm has no residual to add). Anything in a layer's forward
that depends on its index other than through its parameters and caches would be wrong to replicate: such models
are traced whole (``replicable_layers`` checks the configuration's ``layer_types`` and every module's plain
attributes), and the tests compare all layers' logits with HF's on models whose layers have different weights.
"""
import copy
import operator
import os
import re

from torch import Tensor, fx, nn

from graph_passes import layer_split
from graph_passes.fuse_projections_pass import stacked_parameters

ENABLED = os.environ.get("CINFER_REPLICATE_LAYERS", "1") != "0"

TRACED_LAYERS = 2
_SIMPLE = (bool, int, float, str, type(None))


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """``model.model.layers`` (Llama, Mistral, Qwen2 causal LMs), or None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _module_signature(layer: nn.Module) -> list:
    signature = []
    for name, module in layer.named_modules():
        attrs = sorted((k, v) for k, v in vars(module).items()
                       if not k.startswith("_") and k not in ("layer_idx", "training") and isinstance(v, _SIMPLE))
        params = [(n, tuple(p.shape), p.dtype, p.device, p.requires_grad)
                  for n, p in module.named_parameters(recurse=False)]
        buffers = [(n, tuple(b.shape), b.dtype, b.device) for n, b in module.named_buffers(recurse=False)]
        signature.append((name, type(module), attrs, params, buffers))
    return signature


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(layers: nn.ModuleList) -> bool:
    """Hooks on a layer's modules (or global module hooks), or a forward replaced on an instance (as accelerate's
    device-map and offload hooks do), would run only for the traced layers: such models are traced whole."""
    from torch.nn.modules import module as module_mod
    if any(getattr(module_mod, f"_global{h}", None) for h in _HOOKS):
        return True
    return any(getattr(m, h, None) or "forward" in vars(m) or hasattr(m, "_hf_hook")
               for layer in layers for m in layer.modules() for h in _HOOKS)


def replicable_layers(model: nn.Module) -> bool:
    """True when the model has more than ``TRACED_LAYERS`` decoder layers and layers 1 to N-1 are interchangeable."""
    layers = decoder_layers(model)
    # the other layers run as calls added to the split graph (a graph compiled whole has no layer pieces)
    if not (ENABLED and layer_split.ENABLED) or layers is None or len(layers) <= TRACED_LAYERS:
        return False
    layer_types = getattr(model.config, "layer_types", None)
    if (layer_types and len(set(layer_types)) > 1) or _has_hooks(layers):
        return False
    template = _module_signature(layers[1])
    return all(_module_signature(layer) == template for layer in layers[2:])


def truncated_model(model: nn.Module, num_layers: int = TRACED_LAYERS) -> nn.Module:
    """A shallow copy of ``model`` whose decoder-layer list holds its first ``num_layers`` layers. Modules,
    parameters and configuration are shared; the original's module tree is unchanged."""
    outer = copy.copy(model)
    outer.__dict__["_modules"] = dict(model._modules)
    inner = copy.copy(model.model)
    inner.__dict__["_modules"] = dict(model.model._modules)
    inner._modules["layers"] = nn.ModuleList(list(model.model.layers)[:num_layers])
    outer._modules["model"] = inner
    return outer


def _outputs(call: fx.Node) -> dict:
    """Output index -> the node reading it, for a call_module node of a split graph (None: the call's only value)."""
    getitems = {u.args[1]: u for u in call.users if u.op == "call_function" and u.target is operator.getitem}
    return getitems if getitems else {None: call}


class LayerReplication:
    """Extends a split step graph traced over ``TRACED_LAYERS`` layers to all of ``model``'s layers."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.num_layers = len(decoder_layers(model))
        self._param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self._graphs: list[fx.GraphModule] = []
        self._caches: tuple[list[Tensor], list[Tensor]] | None = None

    def bind_caches(self, k_caches: list[Tensor], v_caches: list[Tensor]) -> None:
        """The caches the replicated layers read (their calls fetch them from attributes of the split graph)."""
        self._caches = (list(k_caches), list(v_caches))
        for split in self._graphs:
            self._set_caches(split)

    def _set_caches(self, split: fx.GraphModule) -> None:
        k_caches, v_caches = self._caches
        for layer in range(TRACED_LAYERS, self.num_layers):
            for kind, cache in (("k", k_caches[layer]), ("v", v_caches[layer])):
                name = f"cinfer_{kind}_cache_{layer}"
                if name in split._buffers:
                    split._buffers[name] = cache
                else:
                    split.register_buffer(name, cache, persistent=False)

    def _stacked_group(self, stacked: Tensor, layer_prefix: str) -> list[str] | None:
        """Names (below ``layer_prefix``) of the parameters the projection pass stacked into ``stacked``, in order."""
        storage = stacked.untyped_storage().data_ptr()
        members = [(p.storage_offset(), n[len(layer_prefix):]) for n, p in self.model.named_parameters()
                   if n.startswith(layer_prefix) and p.untyped_storage().data_ptr() == storage]
        return [name for _, name in sorted(members)] or None

    def expand(self, split: fx.GraphModule, example_inputs: list) -> int:
        """Add the calls of layers ``TRACED_LAYERS`` to N-1 to ``split`` (from ``split_module``, its pieces named
        ``submod_<layer + 1>``); returns how many were added."""
        graph = split.graph
        calls = {node.target: node for node in graph.find_nodes(op="call_module")}
        first, template, epilogue = calls.get("submod_1"), calls.get("submod_2"), calls.get("submod_3")
        if first is None or template is None or epilogue is None or len(calls) != 4:
            raise RuntimeError(f"layer replication: expected a prologue, two layers and an epilogue, got pieces "
                               f"{sorted(calls)}")
        if self._caches is None:
            raise RuntimeError("layer replication: bind_caches first")
        values = dict(zip(graph.find_nodes(op="placeholder"), example_inputs))
        k_caches, v_caches = self._caches
        prefix = "model.layers.1."
        first_outputs = {node: index for index, node in _outputs(first).items()}
        template_outputs = _outputs(template)
        if set(template_outputs) != set(first_outputs.values()):
            raise RuntimeError("layer replication: layers 0 and 1 return different outputs")

        # How each input of layer 1's call maps to layer k's. A layer's piece may read the layer before it's
        # parameters too (norm_linear_pass: layer k computes layer k-1's down_proj): offset -1.
        plan = []
        for arg in template.args:
            if not isinstance(arg, fx.Node):
                plan.append(("shared", arg))
            elif arg in first_outputs:
                plan.append(("previous", first_outputs[arg]))
            elif arg.op == "placeholder" and values.get(arg) is k_caches[1]:
                plan.append(("cache", "k"))
            elif arg.op == "placeholder" and values.get(arg) is v_caches[1]:
                plan.append(("cache", "v"))
            else:
                plan.append(self._parameter_plan(split, arg, values, {1: 0, 0: -1}, "layer 1"))
        # The epilogue reads layer 1's parameters as the last layer's (the final norm's statistics in layer 1's
        # down_proj): they become layer N-1's.
        epilogue_plan = [self._parameter_plan(split, arg, values, {1: 0}, "the epilogue")
                         if isinstance(arg, fx.Node) else ("shared", arg) for arg in epilogue.args]

        self._set_caches(split)
        previous = template_outputs
        with graph.inserting_before(epilogue):
            for layer in range(TRACED_LAYERS, self.num_layers):
                args = []
                for kind, what in plan:
                    if kind == "previous":
                        args.append(previous[what])
                    elif kind == "cache":
                        args.append(graph.get_attr(f"cinfer_{what}_cache_{layer}"))
                    elif kind == "shared":
                        args.append(what)
                    else:
                        args.append(self._bind(split, kind, what, layer))
                # runs layer 1's compiled piece, which layer_split put in the instance dict over the submodule
                call = graph.create_node("call_module", template.target, tuple(args))
                previous = ({None: call} if None in template_outputs else
                            {index: graph.call_function(operator.getitem, (call, index)) for index in template_outputs})
            epilogue.args = tuple(arg if kind == "shared" else self._bind(split, kind, what, self.num_layers - 1)
                                  for arg, (kind, what) in zip(epilogue.args, epilogue_plan))
        # Layer 1's outputs now feed layer 2 only; whatever read them after it (the epilogue) reads layer N-1's.
        last = {template_outputs[index]: node for index, node in previous.items()}
        node = epilogue
        while node is not None and node.op != "root":
            node.args = fx.node.map_arg(node.args, lambda n: last.get(n, n))
            node.kwargs = fx.node.map_arg(node.kwargs, lambda n: last.get(n, n))
            node = node.next
        split.recompile()
        self._graphs.append(split)
        return self.num_layers - TRACED_LAYERS

    def _parameter_plan(self, split: fx.GraphModule, arg: fx.Node, values: dict, offsets: dict[int, int],
                        reader: str) -> tuple:
        """How a piece's input maps to another layer's: ("parameter", (offset, name)) for a parameter of a traced
        layer ``i`` in ``offsets`` (then the call for layer k reads layer k + offsets[i]'s), ("stacked", (offset,
        names)) for projections the projection pass stacked, ("shared", arg) for anything not of a layer."""
        if arg.op == "placeholder" and isinstance(values.get(arg), Tensor):
            name = self._param_names.get(id(values[arg]))
            for layer, offset in offsets.items():
                prefix = f"model.layers.{layer}."
                if name is not None and name.startswith(prefix):
                    return "parameter", (offset, name[len(prefix):])
            if name is not None and ".layers." in name:
                raise RuntimeError(f"layer replication: {reader} reads another layer's parameter {name}")
        elif arg.op == "get_attr":
            for layer, offset in offsets.items():
                group = self._stacked_group(getattr(split, arg.target), f"model.layers.{layer}.")
                if group is not None:
                    return "stacked", (offset, tuple(group))
            if reader == "layer 1":
                raise RuntimeError(f"layer replication: no layer-1 parameters behind {arg.target}")
        return "shared", arg

    def _bind(self, split: fx.GraphModule, kind: str, what: tuple, layer: int) -> fx.Node:
        """A get_attr of layer ``layer + offset``'s parameter (or stacked projections) for a call of layer
        ``layer``'s piece (or the epilogue's: the last layer)."""
        offset, names = what
        source = layer + offset
        layer_prefix = f"model.layers.{source}."
        if kind == "parameter":
            attr = f"cinfer_layer_{source}_" + re.sub(r"\W", "_", names)
            if attr not in split._buffers:
                split.register_buffer(attr, self.model.get_parameter(layer_prefix + names), persistent=False)
        else:
            attr = f"cinfer_layer_{source}_stacked_" + re.sub(r"\W", "_", names[0])
            if attr not in split._buffers:
                stacked, _ = stacked_parameters([self.model.get_parameter(layer_prefix + n) for n in names])
                split.register_buffer(attr, stacked, persistent=False)
        return split.graph.get_attr(attr)
