"""The RoPE pass on its own: it fuses each layer's q/k RoPE and cache write into one ``cinfer.rope_kv_cache_write``
on every tiny variant, and leaves a layer alone (keeping ``kv_cache_write``) wherever the pattern is not exactly HF's.
End-to-end numerics of the fused graphs are checked in test_compile_model.py (every variant) and
test_fuse_projections.py (Inductor, with the op reading slices of the fused qkv projection)."""
import logging
import operator

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama

from graph_passes import compile_model
from graph_passes.attention_pass import rewrite_attention
from graph_passes.fx_utils import is_op, op_counts, set_fake
from graph_passes.paged_model import capture_step_graph
from graph_passes.rope_pass import _untokens_major, fuse_rope_kv_cache_write, match_rope
from tests.graph_passes.tiny_models import VARIANTS, PagedDriver, make_caches, make_model, run_scenario
from tests.tolerances import LOGITS

FUSED = torch.ops.cinfer.rope_kv_cache_write.default
WRITE = torch.ops.cinfer.kv_cache_write.default
ATTENTION = torch.ops.cinfer.paged_attention.default


def _attention_rewritten(variant: str, dtype=torch.float32, cache_dtype=None, **overrides):
    """The captured paged graph after the attention pass (the RoPE pass's input), and the model."""
    model = make_model(variant, dtype=dtype, **overrides)
    k_caches, v_caches = make_caches(model)
    if cache_dtype is not None:
        k_caches, v_caches = [c.to(cache_dtype) for c in k_caches], [c.to(cache_dtype) for c in v_caches]
    driver = PagedDriver()
    driver.add(6)
    gm = capture_step_graph(model, k_caches, v_caches, *driver.step_inputs([(0, 0, 6)]))
    assert rewrite_attention(gm) == model.config.num_hidden_layers
    return gm, model


def _rotated_keys(gm):
    """Per layer, the RoPE'd key the attention pass's kv_cache_write reads ([1, kv_heads, tokens, D])."""
    return [_untokens_major(n.args[0]) for n in gm.graph.nodes if n.target is WRITE]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fuses_once_per_layer(variant):
    gm, model = _attention_rewritten(variant)
    layers = model.config.num_hidden_layers
    before = op_counts(gm)
    rejected = []
    assert fuse_rope_kv_cache_write(gm, rejected) == layers and rejected == []
    after = op_counts(gm)
    assert after["cinfer.rope_kv_cache_write.default"] == layers and after["cinfer.kv_cache_write.default"] == 0
    assert after["cinfer.paged_attention.default"] == layers
    # rotate_half (neg, cat of the halves, two slices) and the products and sums are gone for q and k of every layer
    assert before["neg"] == 2 * layers and after["neg"] == 0
    assert after["cat"] == before["cat"] - 2 * layers
    assert after["add"] == before["add"] - 2 * layers
    fused = [n for n in gm.graph.nodes if n.target is FUSED]
    # every layer reads the one cos/sin table of the rotary module, as [tokens, head_dim]
    assert len({n.args[3].args[0] for n in fused}) == len({n.args[4].args[0] for n in fused}) == 1
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for node in fused:
        (attn,) = node.users
        assert attn.target is ATTENTION and attn.args[0] is node and attn.args[1] is node.args[5]
        q, k, v, cos = (n.meta["example_value"] for n in node.args[:4])
        assert q.shape[1:] == (c.num_attention_heads, head_dim) and k.shape[1:] == v.shape[1:]
        assert k.shape[1:] == (c.num_key_value_heads, head_dim) and cos.shape[1:] == (head_dim,)
        assert node.meta["example_value"].shape == q.shape
    gm.graph.lint()


def _interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-J style RoPE (pairs (2i, 2i+1)): not HF Llama's rotate_half, so the pass must not fire."""
    def rotate_pairs(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin


def test_other_rope_is_left_alone(monkeypatch, caplog):
    """A model whose rotary embedding is not HF's rotate_half: the layers keep their RoPE and kv_cache_write, the
    manager says why, and the logits still match HF eager (of the same model)."""
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _interleaved_rope)
    model = make_model("llama3_gqa_rope_scaling")
    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    with caplog.at_level(logging.INFO, logger="graph_passes"):
        run_scenario(model, paged, LOGITS)
    layers = model.config.num_hidden_layers
    assert paged.report["attention"] == layers and paged.report["rope"] == 0
    after = op_counts(paged.graph_module)
    assert after["cinfer.kv_cache_write.default"] == layers and after["cinfer.rope_kv_cache_write.default"] == 0
    assert "RoPE fused with the cache write in 0 of 2 layers" in caplog.text
    assert "apply_rotary_pos_emb" in caplog.text


def test_swapped_rotate_half_halves_are_not_fused():
    """cat((x1, -x2)) instead of cat((-x2, x1)) in one layer's key: that layer alone is left unfused."""
    gm, _ = _attention_rewritten("llama3_gqa_rope_scaling")
    k_embed = _rotated_keys(gm)[1]
    cat = next(a for product in k_embed.args for a in product.args if is_op(a, "cat"))
    negated, first_half = cat.args[0]
    cat.args = ((first_half, negated), *cat.args[1:])
    rejected = []
    assert fuse_rope_kv_cache_write(gm, rejected) == 1
    assert len(rejected) == 1 and "key:" in rejected[0] and "apply_rotary_pos_emb" in rejected[0]
    assert op_counts(gm)["cinfer.kv_cache_write.default"] == 1


def test_key_with_other_sin_is_not_fused():
    """The key rotated with another sin than the query's: fusing would apply the query's to both."""
    gm, _ = _attention_rewritten("llama3_gqa_rope_scaling")
    k_embed = _rotated_keys(gm)[0]
    _, _, sin = match_rope(k_embed)
    sin_product = next(p for p in k_embed.args if any(is_op(a, "cat") for a in p.args))
    sin_unsqueezed = next(a for a in sin_product.args if not is_op(a, "cat"))
    with gm.graph.inserting_before(sin_product):
        negated = gm.graph.call_function(operator.neg, (sin,))
        other = gm.graph.call_method("unsqueeze", (negated, 1))
    set_fake(negated)
    set_fake(other)
    sin_product.replace_input_with(sin_unsqueezed, other)
    rejected = []
    assert fuse_rope_kv_cache_write(gm, rejected) == 1
    assert len(rejected) == 1 and "different cos/sin" in rejected[0]


def test_rotated_key_read_elsewhere_is_not_fused():
    """Another reader of the rotated key would keep HF's RoPE alive: nothing saved, so no fusion."""
    gm, _ = _attention_rewritten("llama2_mha")
    k_embed = _rotated_keys(gm)[0]
    with gm.graph.inserting_after(k_embed):
        gm.graph.call_method("sum", (k_embed,))
    rejected = []
    assert fuse_rope_kv_cache_write(gm, rejected) == 1
    assert len(rejected) == 1 and "has users besides" in rejected[0]


def test_cache_of_another_dtype_is_not_fused():
    """bf16 model, fp32 caches: the op's one rounding to the cache dtype would differ from rounding to bf16 first."""
    gm, _ = _attention_rewritten("llama_mqa", dtype=torch.bfloat16, cache_dtype=torch.float32)
    rejected = []
    assert fuse_rope_kv_cache_write(gm, rejected) == 0
    assert len(rejected) == 2 and all("dtypes differ" in r for r in rejected)
