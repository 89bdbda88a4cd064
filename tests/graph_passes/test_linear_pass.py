"""The linear pass on small hand-written modules: what it rewrites, what it leaves, and that outputs do not change."""
import torch
import torch.nn.functional as F
from torch import nn

from graph_passes.fx_utils import op_counts
from graph_passes.linear_pass import route_linears
from tests.tolerances import ELEMENTWISE, assert_close


class _Mlp(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.gate_up = nn.Linear(8, 12, bias=bias)
        self.down = nn.Linear(6, 5, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up(x).split(6, dim=-1)
        return (self.down(F.silu(gate) * up),)


def _compile(module):
    record = {}

    def backend(gm, example_inputs):
        record["sites"] = route_linears(gm)
        record["after"] = op_counts(gm)
        return gm.forward

    return torch.compile(module, backend=backend, fullgraph=True), record


def _check(module, x=None):
    x = torch.randn(2, 3, 8) if x is None else x
    compiled, record = _compile(module)
    with torch.no_grad():
        for actual, expected in zip(compiled(x), module(x)):
            assert_close(actual, expected, ELEMENTWISE, expected.dtype)
    return record


def test_every_linear_is_rewritten():
    record = _check(_Mlp(bias=True))
    assert record["sites"] == 2
    assert record["after"]["cinfer.linear.default"] == 2 and record["after"]["linear"] == 0


def test_autocast_linear_is_left_alone():
    module = _Mlp()
    compiled, record = _compile(module)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(torch.randn(2, 3, 8))
    assert record["sites"] == 0 and record["after"]["linear"] == 2


def test_linear_needing_grad_is_left_alone():
    compiled, record = _compile(_Mlp())
    compiled(torch.randn(2, 3, 8))
    assert record["sites"] == 0
