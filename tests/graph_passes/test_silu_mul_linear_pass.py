"""The silu_mul_linear pass on small hand-written modules: the gated MLP's down projection becomes one op, anything
that is not exactly ``linear(silu(gate) * up)`` is left alone, and outputs do not change."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graph_passes.fx_utils import op_counts
from graph_passes.linear_pass import route_linears
from graph_passes.silu_mul_linear_pass import fuse_silu_mul_linear
from tests.tolerances import ELEMENTWISE, assert_close


class _GatedMlp(nn.Module):
    """``form`` picks how the product is written: HF's order, swapped operands, a silu used twice, a broadcast
    ``up``, an in-place silu."""

    def __init__(self, form: str, bias: bool = False):
        super().__init__()
        self.form = form
        self.gate_up = nn.Linear(8, 12, bias=bias)
        self.down = nn.Linear(6, 5, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up(x).split(6, dim=-1)
        if self.form == "hf":
            return (self.down(F.silu(gate) * up),)
        if self.form == "swapped":
            return (self.down(up * F.silu(gate)),)
        if self.form == "silu_reused":
            act = F.silu(gate)
            return self.down(act * up), act
        if self.form == "broadcast":
            return (self.down(F.silu(gate) * up[..., :1, :]),)
        if self.form == "inplace":
            return (self.down(F.silu(gate.clone(), inplace=True) * up),)
        raise AssertionError(self.form)


def _run(module, x):
    record = {}

    def backend(gm, example_inputs):
        route_linears(gm)
        record["sites"] = fuse_silu_mul_linear(gm)
        record["after"] = op_counts(gm)
        return gm.forward

    compiled = torch.compile(module, backend=backend, fullgraph=True)
    with torch.no_grad():
        for actual, expected in zip(compiled(x), module(x)):
            assert_close(actual, expected, ELEMENTWISE, expected.dtype)
    return record


@pytest.mark.parametrize("form", ["hf", "swapped"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_down_projection_is_one_op(form, bias):
    record = _run(_GatedMlp(form, bias), torch.randn(2, 3, 8))
    assert record["sites"] == 1
    after = record["after"]
    assert after["cinfer.silu_mul_linear.default"] == 1 and after["cinfer.linear.default"] == 1
    assert after["silu"] == 0 and after["mul"] == 0


@pytest.mark.parametrize("form", ["silu_reused", "broadcast", "inplace"])
def test_other_products_are_left_alone(form):
    record = _run(_GatedMlp(form), torch.randn(2, 3, 8))
    assert record["sites"] == 0
    assert record["after"]["cinfer.silu_mul_linear.default"] == 0 and record["after"]["cinfer.linear.default"] == 2
