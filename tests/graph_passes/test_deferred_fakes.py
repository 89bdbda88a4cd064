"""Fake values of the nodes the passes insert are computed lazily (``fx_utils.set_fake``): under the pass manager,
when a later pass reads one or after the last pass; a pass run on its own fills them before it returns. These
tests pin what that must not change: every node of the handed-on graph has its value, each value is what its
target gives on its inputs' values, nodes removed before anyone read them never had one computed, and a fused
projection's value (evaluated once per operand layout) is exactly ``linear``'s."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch._dispatch.python import enable_python_dispatcher

from graph_passes import (attention_pass, compile_model, fused_add_rms_norm_pass, fx_utils, pass_manager, rms_norm_pass,
                          rope_pass)
from graph_passes.attention_pass import rewrite_attention
from graph_passes.fuse_projections_pass import CONSTANT_PREFIX
from graph_passes.paged_model import capture_step_graph
from tests.graph_passes.tiny_models import PagedDriver, make_caches, make_model, run_scenario
from tests.tolerances import LOGITS

CINFER_OPS = {torch.ops.cinfer.rope_kv_cache_write.default, torch.ops.cinfer.kv_cache_write.default,
              torch.ops.cinfer.paged_attention.default, torch.ops.cinfer.rope_paged_attention.default,
              torch.ops.cinfer.rms_norm.default,
              torch.ops.cinfer.fused_add_rms_norm.default, torch.ops.cinfer.linear.default,
              torch.ops.cinfer.linear_silu_mul.default}
LINEAR_SILU_MUL = torch.ops.cinfer.linear_silu_mul.default
RMS_STATS_LINEAR = torch.ops.cinfer.rms_stats_linear.default
RMS_STATS_LINEAR_SILU_MUL = torch.ops.cinfer.rms_stats_linear_silu_mul.default


def _weight(node):
    """A projection node's weight (after x, or after x, sumsq and eps for a split norm's projection)."""
    return node.args[3] if node.target in (RMS_STATS_LINEAR, RMS_STATS_LINEAR_SILU_MUL) else node.args[1]
LAYOUT_METHODS = {"squeeze", "unsqueeze", "transpose", "contiguous"}


def _captured(variant: str = "llama3_gqa_rope_scaling", **overrides):
    model = make_model(variant, **overrides)
    driver = PagedDriver()
    driver.add(6)
    return capture_step_graph(model, *make_caches(model), *driver.step_inputs([(0, 0, 6)])), model


def _pending(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.meta.get(fx_utils._PENDING)]


def _without_value(gm) -> list[str]:
    """Nodes that compute something but carry no fake value."""
    return [n.name for n in gm.graph.nodes
            if n.op in ("call_function", "call_method") and "example_value" not in n.meta]


def _recomputed(node):
    """``node``'s target run afresh (fake-tensor cache on) on its inputs' recorded values."""
    def value(a):
        return a.meta["example_value"] if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    fake_mode = next(t.fake_mode for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
    with fake_mode, enable_python_dispatcher():
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _assert_same_layout(actual, expected, what: str) -> None:
    actual, expected = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        assert (a.shape, a.stride(), a.dtype, a.device) == (e.shape, e.stride(), e.dtype, e.device), what


@pytest.mark.parametrize("variant", ["llama3_gqa_rope_scaling", "llama_tied_bias", "llama_eager_gqa"])
def test_every_inserted_node_has_its_value(variant):
    """The graph handed to the inner compiler: no value left deferred, and each inserted op's value (the cinfer
    ops, their layout changes, the fused projections' narrows) equals its target evaluated afresh."""
    model = make_model(variant)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    gm = paged.graph_module
    assert _pending(gm) == [] and _without_value(gm) == []
    checked = 0
    for node in gm.graph.nodes:
        inserted = (node.target in CINFER_OPS or node.target is torch.narrow
                    or (node.op == "call_method" and node.target in LAYOUT_METHODS
                        and any(a.target in CINFER_OPS for a in node.all_input_nodes + list(node.users)))
                    or (node.target is operator.getitem and node.args[0].target in CINFER_OPS))
        if inserted:
            _assert_same_layout(node.meta["example_value"], _recomputed(node), node.name)
            checked += 1
    assert checked >= 10 * model.config.num_hidden_layers


def test_removed_nodes_never_get_a_value(monkeypatch):
    """Under the pass manager, the attention pass's token-major copies of q and k (replaced by the RoPE pass) are
    removed before anything reads them, so their fake values are never computed; each other value once. (The last
    pass fuses each layer's rope_kv_cache_write and paged_attention, whose values the linear pass needed first: the
    o projection's input is the attention's output; likewise the norm split pass removes norms after the linear pass
    read their outputs.)"""
    gm, model = _captured()
    inserted, computed, read_from = [], [], {}
    set_fake, compute = fx_utils.set_fake, fx_utils._compute_fake

    def recording_set_fake(node):
        inserted.append(node)
        read_from[node] = node.args[0].target if node.target is operator.getitem else None  # (erasing clears args)
        set_fake(node)

    def recording_compute(node):
        computed.append(node)
        compute(node)

    for module in (attention_pass, rope_pass, rms_norm_pass, fused_add_rms_norm_pass):
        monkeypatch.setattr(module, "set_fake", recording_set_fake)
    monkeypatch.setattr(fx_utils, "_compute_fake", recording_compute)
    report = pass_manager.run_passes(gm, num_layers=model.config.num_hidden_layers)
    assert report["rope"] == model.config.num_hidden_layers
    alive = set(gm.graph.nodes)
    # (the norm split pass removes norms, and their outputs' getitems, that the linear pass read: the projections'
    # inputs)
    fused_away = (torch.ops.cinfer.rope_kv_cache_write.default, torch.ops.cinfer.paged_attention.default,
                  torch.ops.cinfer.fused_add_rms_norm.default)
    assert report["rope_attention"] == model.config.num_hidden_layers
    removed = [n for n in inserted if n not in alive and n.target not in fused_away
               and read_from[n] not in fused_away]
    assert len(removed) >= 6 * model.config.num_hidden_layers  # q and k: squeeze, transpose, contiguous
    assert not set(removed) & set(computed), "a removed node had its fake value computed"
    assert len(computed) == len(set(computed)), "a fake value was computed twice"
    assert {n for n in inserted if n in alive} <= set(computed)
    assert _pending(gm) == [] and _without_value(gm) == []


def test_a_pass_on_its_own_hands_on_every_value():
    gm, model = _captured()
    assert rewrite_attention(gm) == model.config.num_hidden_layers
    assert _pending(gm) == [] and _without_value(gm) == []


def test_passes_deferred_fills_on_exit_only():
    gm, model = _captured()
    with fx_utils.passes_deferred(gm):
        assert rewrite_attention(gm) == model.config.num_hidden_layers
        assert _pending(gm), "inside passes_deferred the inserted nodes' values wait"
    assert _pending(gm) == [] and _without_value(gm) == []
    assert "paged_attention" in gm.code


def test_failed_passes_leave_nothing_deferred_for_the_next_graph():
    """A pass that raises inside passes_deferred: the graph is no longer deferred, so a pass run on it alone
    completes it again."""
    gm, model = _captured()
    with pytest.raises(RuntimeError), fx_utils.passes_deferred(gm):
        rewrite_attention(gm)
        raise RuntimeError("a pass failed")
    assert _pending(gm)
    fx_utils.finish_pass(gm, True)
    assert _pending(gm) == [] and _without_value(gm) == []


@pytest.mark.parametrize("variant", ["llama3_gqa_rope_scaling", "llama_tied_bias"])
def test_fused_projection_values_are_linears(variant):
    """Each fused qkv / gate-up projection's fake value is exactly ``F.linear``'s on its operands (though evaluated
    once per operand layout), and no two share storage."""
    model = make_model(variant, num_hidden_layers=3)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    gm = paged.graph_module
    projections = (torch.ops.cinfer.linear.default, LINEAR_SILU_MUL, RMS_STATS_LINEAR, RMS_STATS_LINEAR_SILU_MUL)
    fused = [n for n in gm.graph.nodes if n.target in projections
             and _weight(n).op == "get_attr" and _weight(n).target.startswith(CONSTANT_PREFIX)]
    assert len(fused) == 2 * paged.traced_layers  # the layers Dynamo traced (layer_replication)
    values = []
    for node in fused:
        args = [a.meta["example_value"] if isinstance(a, torch.fx.Node) else a for a in node.args]
        with args[0].fake_mode, enable_python_dispatcher():
            # (gate/up with its activation, and the projections of a split norm: the op's own fake kernel, a fresh
            # contiguous output)
            expected = F.linear(*args) if node.target is torch.ops.cinfer.linear.default else node.target(*args)
        value = node.meta["example_value"]
        _assert_same_layout(value, expected, node.name)
        assert value.requires_grad == expected.requires_grad and value.storage_offset() == 0
        values.append(value)
    for i, a in enumerate(values):
        assert not any(torch._C._is_alias_of(a, b) for b in values[i + 1:]), "two projections share a fake storage"
