"""The attention pass on its own: where it fires, where it must not, and the pass manager's refusal to under-rewrite."""
import pytest
import torch

from graph_passes import GraphRewriteError
from graph_passes.attention_pass import rewrite_attention
from graph_passes.fx_utils import op_counts, op_name
from graph_passes.paged_model import capture_step_graph
from graph_passes.pass_manager import run_passes
from tests.graph_passes.test_norm_passes import compile_with
from tests.graph_passes.tiny_models import VOCAB, PagedDriver, make_caches, make_model
from tests.tolerances import LOGITS, assert_close


def _captured_paged_graph(variant: str, **overrides):
    """The Dynamo graph ``compile_model`` captures (marker included), before any pass ran."""
    model = make_model(variant, **overrides)
    driver = PagedDriver()
    driver.add(6)
    return capture_step_graph(model, *make_caches(model), *driver.step_inputs([(0, 0, 6)])), model


def _repeat_kv_count(gm) -> int:
    return sum(op_name(n) == "reshape" and op_name(n.args[0]) == "expand" for n in gm.graph.nodes)


@pytest.mark.parametrize("variant", ["llama3_gqa_rope_scaling", "llama_eager_gqa", "llama2_mha"])
def test_attention_pass_counts(variant):
    gm, model = _captured_paged_graph(variant)
    layers = model.config.num_hidden_layers
    before, repeat_kv_before = op_counts(gm), _repeat_kv_count(gm)
    assert rewrite_attention(gm) == layers
    after = op_counts(gm)
    assert before["sdpa"] + before["softmax"] == layers and after["sdpa"] == after["softmax"] == 0
    assert after["cinfer.paged_attention.default"] == after["cinfer.kv_cache_write.default"] == layers
    assert after["cinfer_graph.bind_paged_inputs.default"] == 0
    # repeat_kv (a reshape of an expand, for k and for v; GQA only) is dead once attention reads the kv-head cache
    grouped = model.config.num_attention_heads != model.config.num_key_value_heads
    assert repeat_kv_before == (2 * layers if grouped else 0) and _repeat_kv_count(gm) == 0
    # the norms are untouched by this pass
    assert after["rsqrt"] == before["rsqrt"] == 2 * layers + 1


def test_attention_pass_does_not_fire_without_paged_inputs():
    """A plain model call has no paged cache bound to it: nothing may be rewritten."""
    model = make_model("llama3_gqa_rope_scaling")
    compiled, record = compile_with(lambda ids: model(input_ids=ids, use_cache=False).logits, [rewrite_attention])
    input_ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert_close(compiled(input_ids), model(input_ids=input_ids, use_cache=False).logits, LOGITS, torch.float32)
    assert record["sites"] == [0] and record["after"] == record["before"]


def test_pass_manager_raises_when_a_layer_is_missed():
    """Drop one layer's causal mask from the graph (SDPA without mask and without is_causal = bidirectional):
    that site must not be rewritten, and the manager must raise rather than leave it to SDPA."""
    gm, model = _captured_paged_graph("llama3_gqa_rope_scaling")
    sdpa = [n for n in gm.graph.nodes if op_name(n) == "sdpa"]
    sdpa[1].kwargs = {**sdpa[1].kwargs, "attn_mask": None, "is_causal": False}
    with pytest.raises(GraphRewriteError) as err:
        run_passes(gm, num_layers=model.config.num_hidden_layers, model_name=type(model).__name__)
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "rewrote 1 of 2 layers" in message
    assert "neither a mask nor is_causal" in message


def test_mask_reading_a_parameter_is_not_causal():
    """A mask that depends on a learned tensor (e.g. an attention bias) is not HF's positional causal mask."""
    gm, model = _captured_paged_graph("llama2_mha")
    sdpa = [n for n in gm.graph.nodes if op_name(n) == "sdpa"]
    weight = next(n for n in gm.graph.nodes if n.op == "placeholder" and "norm" in n.name)
    mask = sdpa[0].kwargs["attn_mask"]
    with gm.graph.inserting_before(sdpa[0]):
        biased = gm.graph.call_function(torch.add, (mask, gm.graph.call_method("sum", (weight,))))
    sdpa[0].kwargs = {**sdpa[0].kwargs, "attn_mask": biased}
    rejected = []
    assert rewrite_attention(gm, rejected) == 1
    assert len(rejected) == 1 and "not a causal mask computed from the positions" in rejected[0]
