"""RMSNorm and residual-add passes on plain (unpaged) Dynamo graphs: op counts, numerics, and where they must not fire."""
import logging

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from graph_passes.fused_add_rms_norm_pass import fuse_add_rms_norm
from graph_passes.fx_utils import op_counts
from graph_passes.rms_norm_pass import fuse_rms_norm
from tests.graph_passes.tiny_models import VOCAB, make_model
from tests.tolerances import ELEMENTWISE, LOGITS, assert_close


def compile_with(fn, passes):
    """``torch.compile(fn)`` whose backend applies ``passes`` in order and runs the result eagerly.
    Returns the compiled function and a record filled at the first call: op counts before/after, sites per pass."""
    record = {}

    def backend(gm, example_inputs):
        record["before"] = op_counts(gm)
        record["sites"] = [p(gm) for p in passes]
        record["after"] = op_counts(gm)
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=True), record


def _logits_fn(model):
    def fn(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["llama3_gqa_rope_scaling", "qwen2"])
def test_rms_norm_pass_on_hf_model(variant, dtype):
    model = make_model(variant, dtype=dtype)
    layers = model.config.num_hidden_layers
    compiled, record = compile_with(_logits_fn(model), [fuse_rms_norm])
    input_ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        actual, expected = compiled(input_ids), model(input_ids=input_ids, use_cache=False).logits
    assert record["sites"] == [2 * layers + 1]
    assert record["before"]["rsqrt"] == 2 * layers + 1
    assert record["after"]["rsqrt"] == 0 and record["after"]["pow"] == 0 and record["after"]["mean"] == 0
    assert record["after"]["cinfer.rms_norm.default"] == 2 * layers + 1
    assert record["after"]["sdpa"] == layers  # attention is another pass's business
    assert_close(actual, expected, LOGITS, dtype)


def test_fused_add_rms_norm_pass_on_hf_model():
    model = make_model("llama_tied_bias")
    layers = model.config.num_hidden_layers
    compiled, record = compile_with(_logits_fn(model), [fuse_rms_norm, fuse_add_rms_norm])
    input_ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        actual, expected = compiled(input_ids), model(input_ids=input_ids, use_cache=False).logits
    # every norm but the first layer's input norm (fed by the embedding) follows a residual add
    assert record["sites"] == [2 * layers + 1, 2 * layers]
    assert record["after"]["cinfer.fused_add_rms_norm.default"] == 2 * layers
    assert record["after"]["cinfer.rms_norm.default"] == 1
    assert record["after"]["add"] == record["before"]["add"] - (2 * layers + 1) - 2 * layers  # eps adds + residuals
    assert_close(actual, expected, LOGITS, torch.float32)


def test_fused_add_rms_norm_without_rms_norm_pass_finds_nothing():
    model = make_model("llama2_mha")
    compiled, record = compile_with(_logits_fn(model), [fuse_add_rms_norm])
    with torch.no_grad():
        compiled(torch.randint(0, VOCAB, (1, 4)))
    assert record["sites"] == [0] and record["after"] == record["before"]


class _Block(torch.nn.Module):
    """A residual add and a norm, in the shapes the pass must or must not fuse."""

    def __init__(self, norm: torch.nn.Module, broadcast_residual: bool = False):
        super().__init__()
        self.norm = norm
        self.bias = torch.nn.Parameter(torch.randn(32))
        self.broadcast_residual = broadcast_residual

    def forward(self, x, residual):
        h = x + (self.bias if self.broadcast_residual else residual)
        return self.norm(h), h


def _run_block(block, passes):
    compiled, record = compile_with(block, passes)
    x, residual = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    with torch.no_grad():
        actual, expected = compiled(x, residual), block(x, residual)
    for a, e in zip(actual, expected):
        assert_close(a, e, ELEMENTWISE, torch.float32)
    return record


def _llama_norm() -> LlamaRMSNorm:
    norm = LlamaRMSNorm(32, eps=1e-5)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    return norm


def test_fused_add_fires_on_same_shape_add():
    record = _run_block(_Block(_llama_norm()), [fuse_rms_norm, fuse_add_rms_norm])
    assert record["sites"] == [1, 1]
    assert record["after"]["cinfer.fused_add_rms_norm.default"] == 1 and record["after"]["add"] == 0


def test_fused_add_with_the_norm_weight_defined_after_the_add():
    # With install_free_tensors Dynamo puts the norm weight's get_attr at its first use, between the add and the
    # norm: the fused op must not be placed before it.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(install_free_tensors=True):
        record = _run_block(_Block(_llama_norm()), [fuse_rms_norm, fuse_add_rms_norm])
    torch._dynamo.reset()
    assert record["sites"] == [1, 1]
    assert record["after"]["cinfer.fused_add_rms_norm.default"] == 1 and record["after"]["add"] == 0


class _SumUsedFirst(torch.nn.Module):
    """The residual sum has a user before the norm: the fused op (placed at the norm) cannot replace it."""

    def __init__(self):
        super().__init__()
        self.norm = _llama_norm()

    def forward(self, x, residual):
        h = x + residual
        doubled = h * 2
        return self.norm(h), doubled


def test_fused_add_skips_a_sum_used_before_the_norm():
    record = _run_block(_SumUsedFirst(), [fuse_rms_norm, fuse_add_rms_norm])
    assert record["sites"] == [1, 0]
    assert record["after"]["cinfer.rms_norm.default"] == 1 and record["after"]["add"] == 1


def test_fused_add_does_not_fire_on_broadcasting_add():
    record = _run_block(_Block(_llama_norm(), broadcast_residual=True), [fuse_rms_norm, fuse_add_rms_norm])
    assert record["sites"] == [1, 0]
    assert record["after"]["cinfer.rms_norm.default"] == 1 and record["after"]["add"] == 1


def test_rms_norm_does_not_fire_on_gemma_norm():
    # Gemma scales by (1 + weight) in fp32 before casting back: not cinfer.rms_norm's rounding, not its pattern.
    norm = GemmaRMSNorm(32, eps=1e-6)
    torch.nn.init.uniform_(norm.weight, -0.5, 0.5)
    record = _run_block(_Block(norm), [fuse_rms_norm, fuse_add_rms_norm])
    assert record["sites"] == [0, 0]
    assert record["after"]["rsqrt"] == 1


class _NormOverHeads(torch.nn.Module):
    """RMS statistics over dim 1 (not the last dim): must not be taken for an RMSNorm."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        xf = x.to(torch.float32)
        variance = xf.pow(2).mean(1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(variance + 1e-6)).to(x.dtype)


def test_rms_norm_does_not_fire_on_other_reduction_dim():
    module = _NormOverHeads()
    compiled, record = compile_with(module, [fuse_rms_norm])
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        assert_close(compiled(x), module(x), ELEMENTWISE, torch.float32)
    assert record["sites"] == [0] and record["after"]["rsqrt"] == 1


def test_registered_cinfer_backend_on_plain_model(caplog):
    """``torch.compile(model, backend="cinfer")``: norms and projections rewritten, attention kept as SDPA (and
    logged), via Inductor."""
    model = make_model("llama2_mha", num_hidden_layers=1)
    compiled = torch.compile(model, backend="cinfer", fullgraph=True)
    input_ids = torch.randint(0, VOCAB, (2, 6))
    with caplog.at_level(logging.INFO, logger="graph_passes"), torch.no_grad():
        actual = compiled(input_ids=input_ids, use_cache=False).logits
        expected = model(input_ids=input_ids, use_cache=False).logits
    assert_close(actual, expected, LOGITS, torch.float32)
    assert "attention is left to SDPA" in caplog.text
    assert "attention=0, rope=0, rms_norm=3, fused_add_rms_norm=2, fuse_projections=2" in caplog.text
