"""The marker op that carries the paged-attention inputs into the Dynamo graph.

``compile_model`` compiles a small step function that routes ``input_ids`` through
``cinfer_graph::bind_paged_inputs(input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
k_caches, v_caches)`` before calling the unmodified HF model. Because the marker reads them, Dynamo keeps all those
tensors as graph placeholders (it drops inputs nothing reads), and the attention pass finds them as the marker's
arguments. The pass then wires them into ``cinfer.kv_cache_write`` / ``cinfer.paged_attention`` and erases the
marker, so it never runs in a compiled graph. Run eagerly (only if a pass were skipped) it is a copy of ``input_ids``.
"""
from dataclasses import dataclass

import torch
from torch import Tensor, fx


@torch.library.custom_op("cinfer_graph::bind_paged_inputs", mutates_args=())
def bind_paged_inputs(input_ids: Tensor, positions: Tensor, slot_mapping: Tensor, block_tables: Tensor,
                      seq_lens: Tensor, query_start_loc: Tensor, k_caches: list[Tensor],
                      v_caches: list[Tensor]) -> Tensor:
    """Returns a copy of ``input_ids`` [1, num_tokens]; exists only to make its arguments graph inputs."""
    return input_ids.clone()


@bind_paged_inputs.register_fake
def _(input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, k_caches, v_caches):
    return torch.empty_like(input_ids)


MARKER = torch.ops.cinfer_graph.bind_paged_inputs.default


@dataclass
class PagedInputs:
    """The marker's arguments: graph nodes standing for the step's inputs and the per-layer caches."""
    marker: fx.Node
    input_ids: fx.Node
    positions: fx.Node
    slot_mapping: fx.Node
    block_tables: fx.Node
    seq_lens: fx.Node
    query_start_loc: fx.Node
    k_caches: list[fx.Node]
    v_caches: list[fx.Node]

    @classmethod
    def find(cls, gm: fx.GraphModule) -> "PagedInputs | None":
        markers = [n for n in gm.graph.nodes if n.target is MARKER or n.target is MARKER.overloadpacket]
        if not markers:
            return None
        if len(markers) > 1:
            raise ValueError(f"{len(markers)} bind_paged_inputs markers in one graph; expected one")
        node = markers[0]
        input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, k_caches, v_caches = node.args
        return cls(node, input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc,
                   list(k_caches), list(v_caches))
