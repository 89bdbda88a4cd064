"""``layer_split``: the rewritten graph is compiled one decoder layer at a time, each distinct layer once, and runs
exactly as the whole graph does (logits against HF eager, with different random weights in every layer, so a piece
run with another layer's weights or caches shows)."""
import pytest
import torch
from torch._inductor.utils import fresh_inductor_cache

from graph_passes import compile_model, layer_split
from graph_passes.fx_utils import is_op
from tests.graph_passes.tiny_models import VARIANTS, make_caches, make_model, run_scenario
from tests.tolerances import LOGITS


@pytest.mark.parametrize("num_layers", [1, 3, 5])
def test_compiles_per_distinct_layer_whatever_the_depth(num_layers):
    model = make_model("llama3_gqa_rope_scaling", num_hidden_layers=num_layers)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    report = paged.split_report
    assert report.pieces == num_layers + 2  # prologue, one piece per layer, epilogue
    # prologue, layer 0 (a plain norm first), layers 1.. (the residual add fused into their first norm), epilogue
    assert report.compiled == min(num_layers, 2) + 2
    assert len(report.piece_compiles) == report.compiled


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_reuses_its_layers(variant):
    model = make_model(variant, num_hidden_layers=4)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    assert (paged.split_report.pieces, paged.split_report.compiled) == (6, 4)


def test_a_layer_that_differs_gets_its_own_compile():
    """Pieces match only when their graphs do: a constant (here one layer's norm eps) tells them apart."""
    model = make_model("llama_mqa", num_hidden_layers=4)
    model.model.layers[2].post_attention_layernorm.variance_epsilon = 1e-2
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    assert (paged.split_report.pieces, paged.split_report.compiled) == (6, 5)


def test_pieces_follow_the_layers():
    model = make_model("qwen2", num_hidden_layers=3)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    gm = paged.graph_module
    parts = layer_split.layer_partitions(gm)
    for node, part in parts.items():
        layer = layer_split.node_layer(node)
        if layer is not None:
            assert part == layer + 1, node.format_node()
        for source in node.all_input_nodes:  # no piece reads a later piece's value
            assert parts.get(source, 0) <= part, node.format_node()
    ops = {n: part for n, part in parts.items() if n.op == "call_function"}
    assert {ops[n] for n in ops if is_op(n, "cinfer.paged_attention.default")} == {1, 2, 3}
    assert [part for n, part in ops.items() if is_op(n, "embedding")] == [0]
    assert [part for n, part in ops.items() if is_op(n, "cinfer.linear.default")][-1] == 4  # lm_head: the epilogue


@pytest.mark.parametrize("path, layer", [("L['model'].model.layers.3.self_attn", 3), ("model.layers[12].mlp", 12),
                                         ("L['model'].model.layers.0", 0), ("L['model'].model.norm", None),
                                         ("L['model'].model.layers_extra.1", None), ("L['model'].lm_head", None)])
def test_node_layer_reads_the_module_path(path, layer):
    node = torch.fx.Graph().placeholder("x")
    node.meta["nn_module_stack"] = {"outer": ("L['model']", object), "inner": (path, object)}
    assert layer_split.node_layer(node) == layer


def test_disabled_compiles_the_whole_graph(monkeypatch):
    monkeypatch.setattr(layer_split, "ENABLED", False)
    model = make_model("llama2_mha", num_hidden_layers=3)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    assert (paged.split_report.pieces, paged.split_report.compiled) == (1, 1)


def test_inductor_compiles_each_distinct_piece_once():
    model = make_model("llama3_gqa_rope_scaling", num_hidden_layers=3)
    counters = torch._dynamo.utils.counters
    with fresh_inductor_cache():
        misses, hits = counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]
        paged = compile_model(model, *make_caches(model), inner_backend="inductor")
        run_scenario(model, paged, LOGITS)
    assert (paged.split_report.pieces, paged.split_report.compiled) == (5, 4)
    assert counters["inductor"]["fxgraph_cache_miss"] == misses + 4
    assert counters["inductor"]["fxgraph_cache_hit"] == hits
