"""End to end: ``compile_model`` over a paged cache against HF eager, on tiny random models of every variant."""
import logging

import pytest
import torch
from torch._inductor.utils import fresh_inductor_cache
from transformers import AttentionInterface

from graph_passes import GraphRewriteError, compile_model
from graph_passes.fx_utils import op_counts
from tests.graph_passes.tiny_models import NUM_BLOCKS, VARIANTS, PagedDriver, make_caches, make_model, run_scenario
from tests.tolerances import LOGITS, assert_close


def _assert_rewritten(paged, num_layers: int) -> None:
    """Exact op counts of the graph handed to the inner backend."""
    assert paged.report == {"attention": num_layers, "rope": num_layers, "rms_norm": 2 * num_layers + 1,
                            "fused_add_rms_norm": 2 * num_layers, "fuse_projections": 2 * num_layers,
                            "linear": 4 * num_layers + 1, "silu_mul": num_layers,
                            "linear_silu_mul": num_layers, "norm_split": 2 * num_layers,
                            "rope_attention": num_layers}
    before, after = paged.ops_before, op_counts(paged.graph_module)
    assert before["rsqrt"] == 2 * num_layers + 1
    assert before["sdpa"] + before["softmax"] == num_layers
    assert after["sdpa"] == 0 and after["softmax"] == 0
    assert after["matmul"] == before["matmul"] - 2 * before["softmax"]  # eager attention's two; RoPE may keep one
    assert after["rsqrt"] == 0 and after["mean"] == 0
    # q/k RoPE, the cache write and attention are one op per layer; HF's rotate_half (neg + cat) is gone, only the
    # cat of the rotary module's cos/sin table (shared by all layers) stays.
    assert after["cinfer.rope_paged_attention.default"] == num_layers
    assert after["cinfer.paged_attention.default"] == 0
    assert after["cinfer.rope_kv_cache_write.default"] == 0
    assert after["cinfer.kv_cache_write.default"] == 0
    assert before["neg"] == 2 * num_layers and after["neg"] == 0
    assert after["cat"] == before["cat"] - 2 * num_layers == 1
    # Every norm after a projection is split into it and the projections after it (lm_head's through the rows it
    # reads); the first (after the embedding) stays a norm.
    assert after["cinfer.fused_add_rms_norm.default"] == 0
    assert after["cinfer.rms_norm.default"] == 1
    assert after["cinfer_graph.bind_paged_inputs.default"] == 0
    # rope_paged_attention takes q, k and v as views of the fused qkv projection's output: no copy is asked for.
    for node in paged.graph_module.graph.nodes:
        if node.target is torch.ops.cinfer.rope_paged_attention.default:
            for operand in node.args[:3]:
                assert _projection_view(operand), operand.format_node()
    # per layer q/k/v -> one linear, gate/up -> one linear; o_proj, down_proj and lm_head stay. o_proj and
    # down_proj take the residual add and the next norm's statistics; the projections after them (q/k/v but the
    # first layer's, gate/up with its activation, lm_head) take the norm's scaling; the first q/k/v stays
    # cinfer.linear.
    assert before["linear"] == 7 * num_layers + 1 and after["linear"] == 0
    assert after["cinfer.linear_add_rms_stats.default"] == 2 * num_layers
    assert after["cinfer.rms_stats_linear.default"] == num_layers
    assert after["cinfer.rms_stats_linear_silu_mul.default"] == num_layers
    assert after["cinfer.linear.default"] == 1
    assert after["cinfer.linear_silu_mul.default"] == 0
    assert after["cinfer.silu_mul.default"] == 0
    assert before["silu"] == num_layers and after["silu"] == 0
    # HF's causal-mask construction (packed-sequence detection from positions, the mask itself) is dead and gone.
    assert after["diff"] == 0 and after["cumsum"] == 0
    assert not [n.name for n in paged.graph_module.graph.nodes if "mask" in n.name]


def _projection_view(node) -> bool:
    """True when ``node`` is a chain of views (no copy) down to the fused projection's ``narrow``."""
    while node.op == "call_method" and node.target in ("squeeze", "transpose", "view"):
        node = node.args[0]
    return node.target is torch.narrow


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_hf_eager(variant):
    model = make_model(variant)
    k_caches, v_caches = make_caches(model)
    paged = compile_model(model, k_caches, v_caches, inner_backend="eager")
    run_scenario(model, paged, LOGITS)
    _assert_rewritten(paged, model.config.num_hidden_layers)


def test_logits_match_hf_eager_bf16():
    model = make_model("llama3_gqa_rope_scaling", dtype=torch.bfloat16)
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS, dtype=torch.bfloat16)


def test_inductor_end_to_end():
    model = make_model("llama3_gqa_rope_scaling", num_hidden_layers=1)
    counters = torch._dynamo.utils.counters  # read at each use: Dynamo may swap its inner dicts
    with fresh_inductor_cache():  # an empty on-disk cache: the second compile hits only an identical graph
        paged = compile_model(model, *make_caches(model), inner_backend="inductor")
        run_scenario(model, paged, LOGITS)
        _assert_rewritten(paged, 1)
        # A cache of another size (as free memory gives after a restart) compiles to the same Inductor graph.
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        resized = compile_model(model, *make_caches(model, num_blocks=NUM_BLOCKS + 7), inner_backend="inductor")
        run_scenario(model, resized, LOGITS)
    # One cache entry per distinct piece (``layer_split``): prologue, the layer, epilogue.
    assert resized.split_report.compiled == paged.split_report.compiled == 3
    assert counters["inductor"]["fxgraph_cache_hit"] == hits + 3
    assert counters["inductor"]["fxgraph_cache_miss"] == misses


def test_new_batch_compositions_do_not_recompile():
    model = make_model("llama_mqa")
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    driver = PagedDriver(seed=3)
    for length in (9, 17, 4, 30):
        driver.add(length)
    stats = torch._dynamo.utils.counters["stats"]
    steps = [
        [(0, 0, 5), (1, 0, 7), (2, 0, 3)],                # warm-up: 15 tokens, 3 sequences
        [(0, 5, 9), (1, 7, 8)],                           # 5 tokens, 2 sequences
        [(3, 0, 30)],                                     # one long prefill: 1 sequence, 4 blocks
        [(2, 3, 4)],                                      # 1 token, 1 sequence, 1 block
        [(0, 8, 9), (1, 8, 9), (2, 3, 4), (3, 29, 30)],   # decode of 4 (tokens == sequences == 4)
        [(1, 8, 17), (2, 3, 4)],                          # chunked prefill + decode
    ]
    for i, chunks in enumerate(steps):
        input_ids, positions, meta = driver.step_inputs(chunks)
        paged(input_ids, positions, meta)
        if i == 0:
            graphs, frames = stats["unique_graphs"], stats["calls_captured"]
    assert stats["unique_graphs"] == graphs, "a new batch composition recompiled the graph"
    assert stats["calls_captured"] == frames


@pytest.mark.parametrize("inner_backend, num_layers", [("eager", 2), ("eager", 3), ("inductor", 1)])
def test_set_caches_swaps_in_a_larger_cache_without_recompiling(inner_backend, num_layers):
    # The engine's order on a GPU: warm up over a few blocks, then swap in the real cache. The graph must run on
    # the new caches (the scenario writes and reads blocks the old ones do not have) without recompiling. With 3
    # layers, layer 2 is not traced but replicated (layer_replication): it must follow the swap too.
    model = make_model("llama3_gqa_rope_scaling", num_hidden_layers=num_layers)
    small_k, small_v = make_caches(model, num_blocks=4)
    paged = compile_model(model, small_k, small_v, inner_backend=inner_backend)
    driver = PagedDriver(num_blocks=4)
    driver.add(19)
    chunks = [(0, 0, 19)]
    assert_close(paged(*driver.step_inputs(chunks)), driver.reference_logits(model, chunks), LOGITS, torch.float32)
    small_before = [c.clone() for c in small_k + small_v]
    stats = torch._dynamo.utils.counters["stats"]
    graphs, frames = stats["unique_graphs"], stats["calls_captured"]

    k_caches, v_caches = make_caches(model, num_blocks=NUM_BLOCKS)
    paged.set_caches(k_caches, v_caches)
    assert paged.k_caches == k_caches and paged.v_caches == v_caches
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_scenario(model, paged, LOGITS)
    assert stats["unique_graphs"] == graphs and stats["calls_captured"] == frames, "set_caches recompiled the graph"
    assert any(not c.isnan().all() for c in k_caches + v_caches), "the new caches were never written"
    for before, after in zip(small_before, small_k + small_v):  # the old ones are no longer written
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


def test_set_caches_rejects_caches_unlike_the_current_ones():
    model = make_model("llama2_mha")
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    k_caches, v_caches = make_caches(model, num_blocks=NUM_BLOCKS + 1)
    with pytest.raises(ValueError, match="one per layer"):
        paged.set_caches(k_caches[:1], v_caches[:1])
    with pytest.raises(ValueError, match="contiguous"):
        paged.set_caches([c.transpose(2, 3) for c in k_caches], [c.transpose(2, 3) for c in v_caches])
    with pytest.raises(ValueError, match="like the current ones"):
        paged.set_caches(*make_caches(model, block_size=16))
    with pytest.raises(ValueError, match="like the current ones"):
        paged.set_caches([c.double() for c in k_caches], [c.double() for c in v_caches])
    with pytest.raises(ValueError, match="like the current ones"):  # one block count for every layer
        paged.set_caches([k_caches[0], k_caches[1][:-1].contiguous()], [v_caches[0], v_caches[1][:-1].contiguous()])
    assert paged.k_caches[0].shape[0] == NUM_BLOCKS, "a rejected swap leaves the current caches"


def _non_causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("cinfer_test_non_causal", _non_causal_sdpa)


def test_unrewritable_attention_raises_naming_model_and_pattern():
    model = make_model("llama3_gqa_rope_scaling", attn_implementation="cinfer_test_non_causal")
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    driver = PagedDriver()
    driver.add(5)
    with pytest.raises(GraphRewriteError) as err:
        paged(*driver.step_inputs([(0, 0, 5)]))
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "rewrote 0 of 2 layers" in message
    assert "scaled_dot_product_attention" in message and "not causal" in message


def test_cache_count_mismatch_is_rejected():
    model = make_model("llama2_mha")
    k_caches, v_caches = make_caches(model)
    with pytest.raises(ValueError, match="one per layer"):
        compile_model(model, k_caches[:1], v_caches[:1])


def test_sliding_window_is_warned(caplog):
    model = make_model("mistral", sliding_window=32)
    with caplog.at_level(logging.WARNING, logger="graph_passes"):
        compile_model(model, *make_caches(model), inner_backend="eager")
    assert "sliding-window" in caplog.text


@pytest.mark.parametrize("tokens,batch", [(1, 1), (2, 1), (3, 1), (2, 2), (1, 3), (5, 2)])
def test_size_one_padding_never_gives_a_prefill_as_many_sequences_as_tokens(tokens, batch):
    # PagedModel pads dims of size 1 to 2 (Dynamo's 0/1 specialisation). A step of as many tokens as sequences is
    # a decode step to the ops (at most one query token each: cinfer.rope_paged_attention relies on it), so one
    # sequence of two tokens must not become two sequences of two tokens.
    from graph_passes.attention_metadata import AttentionMetadata
    from graph_passes.paged_model import _pad_dims_of_one

    q_lens = [tokens - batch + 1] + [1] * (batch - 1)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.arange(tokens), block_tables=torch.zeros(batch, 1, dtype=torch.int32),
                             seq_lens=torch.tensor(q_lens, dtype=torch.int32) + 4, query_start_loc=starts,
                             logits_indices=starts[1:].long() - 1)
    ids = torch.arange(tokens)[None]
    (ids2, _, slots, tables, seq_lens, qsl, _), real = _pad_dims_of_one(ids, ids.clone(), meta)
    assert real == batch and tables.shape[0] == seq_lens.shape[0] == qsl.shape[0] - 1 >= 2 and ids2.shape[1] >= 2
    padded_q_lens = (qsl[1:] - qsl[:-1]).tolist()
    assert padded_q_lens[:batch] == q_lens and all(q == 0 for q in padded_q_lens[batch:])
    assert (slots[tokens:] == -1).all() and int(qsl[-1]) == tokens
    if ids2.shape[1] == tables.shape[0]:  # a decode-shaped step: one query token per sequence at most
        assert max(padded_q_lens) <= 1
