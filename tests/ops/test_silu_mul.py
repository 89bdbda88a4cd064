"""cinfer::silu_mul and its Triton kernel against an independent float64 reference.

gate and up are the two halves of a fused gate/up projection's output: column slices of one buffer whose padding
columns and trailing rows are NaN, so a single read outside them would poison an output.
"""
import pytest
import torch
from hypothesis import given, strategies as st

from cinfer_ops.silu_mul import silu_mul_triton
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import ELEMENTWISE, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP_DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def gate_up(gen: torch.Generator, shape: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-zero gate and up of ``shape`` ([..., width]) as strided halves of a NaN-padded buffer."""
    *lead, width = shape
    rows = 1
    for n in lead:
        rows *= n
    magnitude = torch.empty((rows, 2 * width), dtype=torch.float64).uniform_(0.1, 4.0, generator=gen)
    sign = torch.randint(0, 2, (rows, 2 * width), generator=gen, dtype=torch.float64) * 2 - 1
    buf = torch.full((rows + 3, 2 * width + 8), float("nan"), dtype=dtype)
    buf[:rows, :2 * width] = (sign * magnitude).to(dtype)
    buf = buf.to(device)
    return buf[:rows, :width].view(*lead, width), buf[:rows, width:2 * width].view(*lead, width)


def silu_mul_f64(gate, up):
    g = gate.double()
    return g / (1 + torch.exp(-g)) * up.double()


@given(rows=st.integers(1, 40), width=st.one_of(st.integers(1, 300), st.sampled_from([64, 2048, 2100])),
       block=st.sampled_from([None, 16, 128]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_float64_reference(rows, width, block, dtype, seed):
    gate, up = gate_up(torch.Generator().manual_seed(seed), (1, rows, width), dtype, TRITON_DEVICE)
    out = silu_mul_triton(gate, up, block=block)
    assert out.shape == (1, rows, width) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, silu_mul_f64(gate, up), ELEMENTWISE, dtype)


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_float64_reference(device, dtype):
    gate, up = gate_up(torch.Generator().manual_seed(1), (3, 5, 136), dtype, device)
    out = torch.ops.cinfer.silu_mul(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, silu_mul_f64(gate, up), ELEMENTWISE, dtype)
    # torch's own rounding (silu rounded to the dtype, then the product): equal up to one ulp of the product
    assert_close(out, torch.nn.functional.silu(gate) * up, ELEMENTWISE, dtype)


def test_opcheck():
    for device in OP_DEVICES:
        gate, up = gate_up(torch.Generator().manual_seed(2), (4, 24), torch.float32, device)
        torch.library.opcheck(torch.ops.cinfer.silu_mul.default, (gate, up))


def test_zero_rows():
    gate = torch.empty(0, 16, device=TRITON_DEVICE)
    assert silu_mul_triton(gate, gate).shape == (0, 16)
    assert torch.ops.cinfer.silu_mul(torch.empty(2, 0, 16), torch.empty(2, 0, 16)).shape == (2, 0, 16)


def test_bad_input_is_named():
    gate = torch.randn(2, 16)
    with pytest.raises(ValueError, match="must match gate"):
        torch.ops.cinfer.silu_mul(gate, torch.randn(2, 15))
    with pytest.raises(ValueError, match="must match gate"):
        silu_mul_triton(gate.to(TRITON_DEVICE), gate.half().to(TRITON_DEVICE))
    with pytest.raises(ValueError, match="float tensor"):
        torch.ops.cinfer.silu_mul(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64))
