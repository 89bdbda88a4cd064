"""The norm split pass on small hand-written modules: a residual add and RMSNorm between two projections become
``linear_add_rms_stats`` + ``rms_stats_linear[_silu_mul]``; anything that is not exactly that is left alone, and
outputs do not change (beyond the norm's rounding)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from graph_passes import norm_linear_pass
from graph_passes.fused_add_rms_norm_pass import fuse_add_rms_norm
from graph_passes.fx_utils import op_counts
from graph_passes.linear_pass import route_linears
from graph_passes.norm_linear_pass import split_norms
from graph_passes.rms_norm_pass import fuse_rms_norm
from tests.tolerances import LOGITS, assert_close


class _Block(nn.Module):
    """``o_proj`` -> residual add -> RMSNorm -> projection(s). ``form``: HF's shape, two projections of the norm,
    the projection read elsewhere too, the norm read by a non-projection, the rows of the norm picked (as before
    lm_head), those rows picked along the last dim."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.o_proj = nn.Linear(24, 32, bias=False)
        self.norm = LlamaRMSNorm(32, eps=1e-6)
        self.norm.weight.data.uniform_(0.5, 1.5)
        self.q = nn.Linear(32, 16, bias=False)
        self.k = nn.Linear(32, 8, bias=True)

    def forward(self, a, residual, rows):
        y = self.o_proj(a)
        h = residual + y
        x = self.norm(h)
        if self.form == "hf":
            return self.q(x), h
        if self.form == "two_projections":
            return self.q(x), self.k(x), h
        if self.form == "projection_read_elsewhere":
            return self.q(x), h, y
        if self.form == "norm_read_elsewhere":
            return self.q(x), h, x * 2
        if self.form == "rows":
            return self.q(x[:, rows, :]), h
        if self.form == "columns":
            return self.q(x[:, :, :32][:, rows]), h
        raise AssertionError(self.form)


def _run(form: str, tokens: int = 5):
    torch._dynamo.reset()  # every test compiles _Block.forward afresh
    module = _Block(form)
    record = {}

    def backend(gm, example_inputs):
        record["sites"] = [p(gm) for p in (fuse_rms_norm, fuse_add_rms_norm, route_linears, split_norms)]
        record["after"] = op_counts(gm)
        return gm.forward

    gen = torch.Generator().manual_seed(tokens)
    a, residual = torch.randn(1, tokens, 24, generator=gen), torch.randn(1, tokens, 32, generator=gen)
    rows = torch.tensor([tokens - 1, 0])
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    with torch.no_grad():
        for actual, expected in zip(compiled(a, residual, rows), module(a, residual, rows)):
            assert_close(actual, expected, LOGITS, torch.float32)
    return record


@pytest.mark.parametrize("tokens", [5, 20])  # both of the ops' modes: statistics, and the whole norm (many rows)
@pytest.mark.parametrize("form", ["hf", "two_projections", "rows"])
def test_norm_between_projections_is_split(form, tokens):
    record = _run(form, tokens)
    after = record["after"]
    assert record["sites"][-1] == 1
    assert after["cinfer.linear_add_rms_stats.default"] == 1 and after["cinfer.fused_add_rms_norm.default"] == 0
    assert after["cinfer.rms_stats_linear.default"] == (2 if form == "two_projections" else 1)
    assert after["cinfer.linear.default"] == 0


@pytest.mark.parametrize("form", ["projection_read_elsewhere", "norm_read_elsewhere", "columns"])
def test_does_not_fire(form):
    record = _run(form)
    assert record["sites"][-1] == 0
    assert record["after"]["cinfer.fused_add_rms_norm.default"] == 1
    assert record["after"]["cinfer.linear_add_rms_stats.default"] == 0


def test_switch_off(monkeypatch):
    monkeypatch.setattr(norm_linear_pass, "SPLIT_NORMS", False)
    record = _run("hf")
    assert record["sites"][-1] == 0 and record["after"]["cinfer.fused_add_rms_norm.default"] == 1


def test_gated_projection_after_the_norm():
    """A norm feeding a fused gate/up projection with its activation (cinfer.linear_silu_mul) becomes
    rms_stats_linear_silu_mul."""
    gen = torch.Generator().manual_seed(0)
    o_w, gate_up_w = torch.randn(32, 24, generator=gen) / 5, torch.randn(40, 32, generator=gen) / 6
    norm_w = torch.rand(32, generator=gen) + 0.5
    a, residual = torch.randn(1, 3, 24, generator=gen), torch.randn(1, 3, 32, generator=gen)

    def fn(a, residual):
        # (the overloads the passes insert)
        y = torch.ops.cinfer.linear.default(a, o_w, None)
        x, h = torch.ops.cinfer.fused_add_rms_norm.default(y, residual, norm_w, 1e-6)
        return torch.ops.cinfer.linear_silu_mul.default(x, gate_up_w, None), h

    record = {}

    def backend(gm, example_inputs):
        record["sites"] = split_norms(gm)
        record["after"] = op_counts(gm)
        return gm.forward

    actual = torch.compile(fn, backend=backend, fullgraph=True)(a, residual)
    assert record["sites"] == 1 and record["after"]["cinfer.rms_stats_linear_silu_mul.default"] == 1
    h = residual + F.linear(a, o_w)
    x = norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    gate, up = F.linear(x, gate_up_w).chunk(2, -1)
    assert_close(actual[0], F.silu(gate) * up, LOGITS, torch.float32)
    assert_close(actual[1], h, LOGITS, torch.float32)
