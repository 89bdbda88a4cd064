"""The RoPE + attention pass: each layer's ``cinfer.rope_kv_cache_write`` feeding ``cinfer.paged_attention`` becomes
one ``cinfer.rope_paged_attention`` on every tiny variant, wired to the same caches, slots and metadata; a site
that is not exactly that (the rotated query read elsewhere, attention over other caches, a cache reader in between,
the flag off) is left alone; and the fused graph's logits equal the unfused graph's (exactly: on the CPU the op is
the two references in a row) and HF eager's."""
import copy

import pytest
import torch

from graph_passes import compile_model, rope_attention_pass
from graph_passes.attention_pass import rewrite_attention
from graph_passes.fx_utils import op_counts
from graph_passes.paged_model import capture_step_graph
from graph_passes.rope_attention_pass import fuse_rope_attention
from graph_passes.rope_pass import fuse_rope_kv_cache_write
from tests.graph_passes.tiny_models import VARIANTS, PagedDriver, make_caches, make_model, run_scenario
from tests.tolerances import LOGITS, assert_close

ROPE = torch.ops.cinfer.rope_kv_cache_write.default
ATTENTION = torch.ops.cinfer.paged_attention.default
FUSED = torch.ops.cinfer.rope_paged_attention.default


def _rope_fused(variant: str, **overrides):
    """The captured paged graph after the attention and RoPE passes (this pass's input), and the model."""
    model = make_model(variant, **overrides)
    driver = PagedDriver()
    driver.add(6)
    gm = capture_step_graph(model, *make_caches(model), *driver.step_inputs([(0, 0, 6)]))
    layers = model.config.num_hidden_layers
    assert rewrite_attention(gm) == layers and fuse_rope_kv_cache_write(gm) == layers
    return gm, model


def _sites(gm) -> list[tuple]:
    """Per layer, in graph order: (rope op, its attention), as the RoPE pass leaves them."""
    return [(n, next(iter(n.users))) for n in gm.graph.nodes if n.target is ROPE]


def _counts(gm) -> tuple[int, int, int]:
    after = op_counts(gm)
    return (after["cinfer.rope_paged_attention.default"], after["cinfer.rope_kv_cache_write.default"],
            after["cinfer.paged_attention.default"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fuses_once_per_layer(variant):
    gm, model = _rope_fused(variant)
    layers = model.config.num_hidden_layers
    expected = []
    for rope, attn in _sites(gm):
        prev = rope.prev if attn.prev is rope else attn.prev
        expected.append(dict(args=(*rope.args, *attn.args[3:]), prev=prev, next=attn.next, users=list(attn.users),
                             value=attn.meta["example_value"], stack=attn.meta["nn_module_stack"],
                             trace=attn.meta.get("stack_trace")))
    rejected = []
    assert fuse_rope_attention(gm, rejected) == layers and rejected == []
    assert _counts(gm) == (layers, 0, 0)
    fused = [n for n in gm.graph.nodes if n.target is FUSED]
    scale = model.model.layers[0].self_attn.scaling
    for layer, (node, want) in enumerate(zip(fused, expected)):
        assert node.args == want["args"] and not node.kwargs
        # the caches the layer writes and attends over, the step's slots and metadata, HF's scale
        (query, key, value, cos, sin, k_cache, v_cache, slots, tables, seq_lens, qsl, node_scale) = node.args
        assert (k_cache.target, v_cache.target) == (f"L_k_caches_{layer}_", f"L_v_caches_{layer}_")
        assert [a.target for a in (slots, tables, seq_lens, qsl)] == [
            "L_slot_mapping_", "L_block_tables_", "L_seq_lens_", "L_query_start_loc_"]
        assert node_scale == scale
        # in the attention's place, feeding what it fed, with its meta
        assert node.prev is want["prev"] and node.next is want["next"] and list(node.users) == want["users"]
        assert node.meta["example_value"] is want["value"]
        assert node.meta["nn_module_stack"] == want["stack"] and node.meta.get("stack_trace") == want["trace"]
        assert node.meta["example_value"].shape == query.meta["example_value"].shape
    gm.graph.lint()


def test_keyword_arguments_are_matched():
    """The two ops called with keyword arguments: the fused op gets the same operands, positionally."""
    gm, model = _rope_fused("llama3_gqa_rope_scaling")
    names = [a.name for a in ROPE._schema.arguments], [a.name for a in ATTENTION._schema.arguments]
    expected = []
    for rope, attn in _sites(gm):
        expected.append((*rope.args, *attn.args[3:]))
        rope.args, rope.kwargs = rope.args[:1], dict(zip(names[0][1:], rope.args[1:]))
        attn.args, attn.kwargs = (), dict(zip(names[1], attn.args))
    assert fuse_rope_attention(gm) == model.config.num_hidden_layers
    assert [n.args for n in gm.graph.nodes if n.target is FUSED] == expected


def test_rotated_query_read_elsewhere_is_not_fused():
    """The fused op does not return the rotated query: another reader of it keeps the two ops."""
    gm, _ = _rope_fused("llama2_mha")
    rope, attn = _sites(gm)[1]
    with gm.graph.inserting_after(attn):
        gm.graph.call_method("sum", (rope,))
    rejected = []
    assert fuse_rope_attention(gm, rejected) == 1
    assert len(rejected) == 1 and rope.name in rejected[0] and "2 users" in rejected[0]
    assert _counts(gm) == (1, 1, 1)


def test_attention_over_other_caches_is_not_fused():
    """Layer 0's attention re-pointed at layer 1's caches: it does not read what the RoPE op wrote."""
    gm, _ = _rope_fused("llama_mqa")
    (rope0, attn0), (rope1, _) = _sites(gm)
    attn0.args = (attn0.args[0], rope1.args[5], rope1.args[6], *attn0.args[3:])
    rejected = []
    assert fuse_rope_attention(gm, rejected) == 1
    assert len(rejected) == 1 and rope0.name in rejected[0] and "other caches" in rejected[0]
    assert _counts(gm) == (1, 1, 1)


@pytest.mark.parametrize("through_view", [False, True])
def test_cache_reader_in_between_is_not_fused(through_view):
    """A node between the two ops reads layer 0's v cache (directly, or a view of it taken earlier): moving the
    write down to the attention would change what it reads."""
    gm, _ = _rope_fused("llama3_gqa_rope_scaling")
    rope, attn = _sites(gm)[0]
    v_cache = rope.args[6]
    source = v_cache
    if through_view:
        with gm.graph.inserting_before(rope):
            source = gm.graph.call_method("view", (v_cache, -1))
    with gm.graph.inserting_before(attn):
        reader = gm.graph.call_method("sum", (source,))
    rejected = []
    assert fuse_rope_attention(gm, rejected) == 1
    assert len(rejected) == 1 and rope.name in rejected[0] and reader.name in rejected[0]
    assert _counts(gm) == (1, 1, 1)


def test_flag_off_rewrites_nothing(monkeypatch):
    gm, model = _rope_fused("qwen2")
    before = op_counts(gm)
    monkeypatch.setattr(rope_attention_pass, "ROPE_ATTENTION", False)
    assert fuse_rope_attention(gm) == 0
    assert op_counts(gm) == before
    assert _counts(gm) == (0, model.config.num_hidden_layers, model.config.num_hidden_layers)


@pytest.mark.parametrize("variant, inner_backend", [("llama3_gqa_rope_scaling", "eager"), ("llama_head_dim", "eager"),
                                                    ("qwen2", "inductor")])
def test_fused_logits_equal_unfused(variant, inner_backend, monkeypatch):
    """The whole pass manager with and without this pass (the flag, read when the graph is compiled): the same
    logits through prefill, chunked prefill, mixed and decode steps, and HF eager's; the caches written alike."""
    model = make_model(variant, num_hidden_layers=1 if inner_backend == "inductor" else 2)
    layers = model.config.num_hidden_layers
    fused_caches, unfused_caches = make_caches(model), make_caches(model)
    fused = compile_model(model, *fused_caches, inner_backend=inner_backend)
    unfused_model = copy.deepcopy(model)
    unfused = compile_model(unfused_model, *unfused_caches, inner_backend=inner_backend)
    with monkeypatch.context() as m:  # the first call compiles
        m.setattr(rope_attention_pass, "ROPE_ATTENTION", False)
        run_scenario(unfused_model, unfused, LOGITS)
    run_scenario(model, fused, LOGITS)
    assert fused.report["rope_attention"] == layers and unfused.report["rope_attention"] == 0
    assert _counts(fused.graph_module) == (layers, 0, 0)
    assert _counts(unfused.graph_module) == (0, layers, layers)

    driver = PagedDriver(seed=2)
    for length in (11, 6):
        driver.add(length)
    # prefill; a decode batch of two; a sequence re-written in place
    for i, chunks in enumerate([[(0, 0, 10), (1, 0, 5)], [(0, 10, 11), (1, 5, 6)], [(0, 0, 11)]]):
        inputs = driver.step_inputs(chunks)
        expected, actual = unfused(*inputs), fused(*inputs)
        # exact on the CPU: the op runs the two ops' references in a row
        assert_close(actual, expected, {torch.float32: (0.0, 0.0)}, torch.float32, msg=f"step {i}")
    for a, b in zip(fused_caches[0] + fused_caches[1], unfused_caches[0] + unfused_caches[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
