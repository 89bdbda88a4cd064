"""The silu_mul pass on small hand-written modules: a gated MLP's ``silu(gate) * up`` becomes one op, anything
that is not exactly that is left alone, and outputs do not change."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graph_passes.fx_utils import op_counts
from graph_passes.silu_mul_pass import fuse_silu_mul
from tests.tolerances import ELEMENTWISE, assert_close


class _GatedMlp(nn.Module):
    """``form`` picks how the product is written: HF's order, swapped operands, a silu used twice, a broadcast
    ``up``, an in-place silu, a product promoted to fp32."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.gate_up = nn.Linear(8, 12)
        self.down = nn.Linear(6, 5)

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
        if self.form == "promoted":
            return (self.down((F.silu(gate.half()) * up).float()),)
        raise AssertionError(self.form)


def _run(module, x):
    record = {}

    def backend(gm, example_inputs):
        record["sites"] = fuse_silu_mul(gm)
        record["after"] = op_counts(gm)
        return gm.forward

    compiled = torch.compile(module, backend=backend, fullgraph=True)
    with torch.no_grad():
        for actual, expected in zip(compiled(x), module(x)):
            assert_close(actual, expected, ELEMENTWISE, expected.dtype)
    return record


@pytest.mark.parametrize("form", ["hf", "swapped"])
def test_gated_activation_is_one_op(form):
    record = _run(_GatedMlp(form), torch.randn(2, 3, 8))
    assert record["sites"] == 1
    assert record["after"]["cinfer.silu_mul.default"] == 1
    assert record["after"]["silu"] == 0 and record["after"]["mul"] == 0


@pytest.mark.parametrize("form", ["silu_reused", "broadcast", "inplace", "promoted"])
def test_other_products_are_left_alone(form):
    record = _run(_GatedMlp(form), torch.randn(2, 3, 8))
    assert record["sites"] == 0 and record["after"]["cinfer.silu_mul.default"] == 0
