"""``layer_split``: the rewritten graph is compiled one decoder layer at a time, each distinct layer once, and runs
exactly as the whole graph does (logits against HF eager, with different random weights in every layer, so a piece
run with another layer's weights or caches shows)."""
import pytest
import torch
from torch._inductor.utils import fresh_inductor_cache

from graph_passes import compile_model, layer_replication, layer_split
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
    assert paged.traced_layers == 2  # layers 2 and 3 run layer 1's piece without having been traced


@pytest.mark.parametrize("replicate", [True, False], ids=["replicated", "traced"])
def test_a_layer_that_differs_gets_its_own_compile(monkeypatch, replicate):
    """Pieces match only when their graphs do: a constant (here one layer's norm eps) tells them apart. Such a
    model is traced whole: its layers are not interchangeable, so none is replicated."""
    monkeypatch.setattr(layer_replication, "ENABLED", replicate)
    model = make_model("llama_mqa", num_hidden_layers=4)
    model.model.layers[2].post_attention_layernorm.variance_epsilon = 1e-2
    assert not layer_replication.replicable_layers(model)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    assert paged.traced_layers == 4
    assert (paged.split_report.pieces, paged.split_report.compiled) == (6, 5)


def test_replicated_layers_match_traced_ones(monkeypatch):
    """Six layers traced whole and six layers of which four are replicated give the same logits, both HF's."""
    model = make_model("llama_tied_bias", num_hidden_layers=6)  # biases: stacked q/k/v biases are replicated too
    assert layer_replication.replicable_layers(model)
    replicated = compile_model(model, *make_caches(model), inner_backend="eager")
    assert replicated.traced_layers == 2
    steps = run_scenario(model, replicated, LOGITS)
    monkeypatch.setattr(layer_replication, "ENABLED", False)
    traced = compile_model(model, *make_caches(model), inner_backend="eager")
    assert traced.traced_layers == 6
    assert run_scenario(model, traced, LOGITS) == steps
    for paged in (replicated, traced):
        assert (paged.split_report.pieces, paged.split_report.compiled) == (8, 4)
    # every layer wrote its own cache, replicated ones included
    for k in replicated.k_caches:
        assert not k.isnan().all()


class _ScaledHead(torch.nn.Module):
    """An lm_head that reads the final norm's output through a product: that norm cannot be split."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.weight = head.weight

    def forward(self, hidden_states):
        return self.head(hidden_states * 0.5)


def test_norms_between_layers_split_all_or_none():
    """A final norm that cannot be split keeps every norm between layers (the next layer's input norms) too, so
    the replicated layers' pieces still take and return what the traced ones do; the norms within a layer are
    split, and the logits are HF's."""
    model = make_model("llama3_gqa_rope_scaling", num_hidden_layers=4)
    model.lm_head = _ScaledHead(model.lm_head)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    assert paged.traced_layers == 2 and paged.split_report.pieces == 6
    assert paged.report["norm_split"] == 2  # the two traced layers' post-attention norms
    ops = [n for n in paged.graph_module.graph.nodes if n.op == "call_function"]
    assert sum(is_op(n, "cinfer.fused_add_rms_norm.default") for n in ops) == 2


def test_truncated_model_leaves_the_model_alone():
    model = make_model("mistral", num_hidden_layers=5)
    layers = list(model.model.layers)
    short = layer_replication.truncated_model(model, 2)
    assert len(short.model.layers) == 2 and short.model.layers[1] is layers[1]
    assert short.lm_head is model.lm_head and short.model.embed_tokens is model.model.embed_tokens
    assert list(model.model.layers) == layers and model.model is not short.model
    assert dict(model.named_parameters()).keys() >= dict(short.named_parameters()).keys()


def test_a_model_with_hooks_is_traced_whole():
    """A hook on any layer would run for the traced layers only."""
    model = make_model("llama_mqa", num_hidden_layers=4)
    assert layer_replication.replicable_layers(model)
    seen = []
    handle = model.model.layers[3].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not layer_replication.replicable_layers(model)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    assert paged.traced_layers == 4 and seen
    handle.remove()
    assert layer_replication.replicable_layers(model)
    # a forward replaced on an instance (accelerate's hooks do that) counts as a hook
    mlp = model.model.layers[2].mlp
    mlp.forward = type(mlp).forward.__get__(mlp)
    assert not layer_replication.replicable_layers(model)


def test_layer_types_that_differ_are_not_replicated():
    model = make_model("qwen2", num_hidden_layers=4)
    assert layer_replication.replicable_layers(model)
    model.config.layer_types = ["full_attention", "full_attention", "sliding_attention", "full_attention"]
    assert not layer_replication.replicable_layers(model)


def test_pieces_follow_the_layers(monkeypatch):
    monkeypatch.setattr(layer_replication, "ENABLED", False)  # trace all three layers
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
    assert {ops[n] for n in ops if is_op(n, "cinfer.rope_paged_attention.default")} == {1, 2, 3}
    assert [part for n, part in ops.items() if is_op(n, "embedding")] == [0]
    # lm_head is the epilogue's, and so is the last layer's down_proj (with the final norm's statistics); each
    # layer's but the first computes the down_proj of the layer before it
    assert [part for n, part in ops.items() if is_op(n, "cinfer.rms_stats_linear.default")][-1] == 4
    assert [part for n, part in ops.items() if is_op(n, "cinfer.linear_add_rms_stats.default")] == [1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("path, layer", [("L['model'].model.layers.3.self_attn", 3), ("model.layers[12].mlp", 12),
                                         ("L['model'].model.layers.0", 0), ("L['model'].model.norm", None),
                                         ("L['model'].model.layers_extra.1", None), ("L['model'].lm_head", None)])
def test_node_layer_reads_the_module_path(path, layer):
    node = torch.fx.Graph().placeholder("x")
    node.meta["nn_module_stack"] = {"outer": ("L['model']", object), "inner": (path, object)}
    assert layer_split.node_layer(node) == layer


def test_a_traced_prefix_is_never_compiled_whole(monkeypatch):
    """Compiled whole, a graph traced over two of four layers would silently skip two: that must fail loudly."""
    model = make_model("llama2_mha", num_hidden_layers=4)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    assert paged.traced_layers == 2
    monkeypatch.setattr(layer_split, "ENABLED", False)
    with pytest.raises(Exception, match="must be split"):
        run_scenario(model, paged, LOGITS)


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
