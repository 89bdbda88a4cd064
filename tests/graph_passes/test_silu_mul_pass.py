"""The silu_mul and linear_silu_mul passes on small hand-written modules: a gated MLP's ``silu(gate) * up``
becomes one op, then one op with its fused gate/up projection; anything that is not exactly that is left alone,
and outputs do not change."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graph_passes.fuse_projections_pass import fuse_projections
from graph_passes.fx_utils import op_counts
from graph_passes.linear_pass import route_linears
from graph_passes.silu_mul_pass import fuse_linear_silu_mul, fuse_silu_mul
from tests.tolerances import ELEMENTWISE, MATMUL, assert_close


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


# --- linear_silu_mul: the fused gate/up projection folded into the activation -------------------------------------

class _HfMlp(nn.Module):
    """HF's ``LlamaMLP``: separate gate/up projections (``fuse_projections`` stacks them). ``form``: "hf";
    "up_first" (the stack puts up's rows first); "gate_reused" (the gate projection is read twice)."""

    def __init__(self, form: str, bias: bool = False):
        super().__init__()
        self.form = form
        self.gate_proj = nn.Linear(8, 6, bias=bias)
        self.up_proj = nn.Linear(8, 6, bias=bias)
        self.down_proj = nn.Linear(6, 5, bias=False)

    def forward(self, x):
        if self.form == "up_first":
            up = self.up_proj(x)
            return (self.down_proj(F.silu(self.gate_proj(x)) * up),)
        gate = self.gate_proj(x)
        if self.form == "gate_reused":
            return self.down_proj(F.silu(gate) * self.up_proj(x)), gate
        return (self.down_proj(F.silu(gate) * self.up_proj(x)),)


def _run_mlp_passes(module, x):
    """The passes that lead to linear_silu_mul, in the manager's order, then the graph eagerly."""
    record = {}

    def backend(gm, example_inputs):
        record["fused"] = fuse_projections(gm, list(example_inputs))
        route_linears(gm)
        record["silu_mul"] = fuse_silu_mul(gm)
        record["sites"] = fuse_linear_silu_mul(gm)
        record["after"] = op_counts(gm)
        return gm.forward

    expected = module(x)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    with torch.no_grad():
        for actual, want in zip(compiled(x), expected):
            assert_close(actual, want, MATMUL, want.dtype)
    return record


@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_projection_and_activation_are_one_op(bias):
    record = _run_mlp_passes(_HfMlp("hf", bias), torch.randn(2, 3, 8))
    assert record["fused"] == 1 and record["silu_mul"] == 1 and record["sites"] == 1
    after = record["after"]
    assert after["cinfer.linear_silu_mul.default"] == 1
    assert after["cinfer.silu_mul.default"] == 0 and after["narrow"] == 0
    assert after["cinfer.linear.default"] == 1  # down_proj


@pytest.mark.parametrize("form", ["up_first", "gate_reused"])
def test_other_gate_up_layouts_keep_two_ops(form):
    """up's rows first in the stack, or a gate projection read elsewhere too: the linear and silu_mul stay."""
    record = _run_mlp_passes(_HfMlp(form), torch.randn(2, 3, 8))
    assert record["sites"] == 0
    assert record["after"]["cinfer.linear_silu_mul.default"] == 0
