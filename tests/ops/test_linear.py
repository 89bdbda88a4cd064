"""cinfer::linear, cinfer::linear_silu_mul and their streaming Triton kernel against independent float64 references.

Inputs are random and never zero. The x rows and weight rows the kernel must not read (past M, past N, the padding
between strided weight rows) are NaN: a single read of one would poison an output.
"""
import importlib

import pytest
import torch
from hypothesis import given, strategies as st

from cinfer_ops.linear import MAX_STREAM_ROWS, LinearConfig, linear_stream_triton, pick_linear_config
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import ELEMENTWISE, GATED_MATMUL, MATMUL, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP_DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def nonzero(gen: torch.Generator, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Random signs times magnitudes in [0.1, 1)."""
    magnitude = torch.empty(shape, dtype=torch.float64).uniform_(0.1, 1.0, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
    return (sign * magnitude).to(dtype)


def poisoned_operands(gen, m, n, k, dtype, bias, row_pad, device):
    """x [m, k] and weight [n, k] as views of NaN-filled buffers: x is followed by NaN rows, the weight has
    ``row_pad`` NaN columns after each row and NaN rows after its last; bias (if any) is followed by NaN."""
    x_buf = torch.full((m + 3, k), float("nan"), dtype=dtype)
    x_buf[:m] = nonzero(gen, (m, k), dtype)
    w_buf = torch.full((n + 5, k + row_pad), float("nan"), dtype=dtype)
    w_buf[:n, :k] = nonzero(gen, (n, k), dtype)
    b = None
    if bias:
        b_buf = torch.full((n + 7,), float("nan"), dtype=dtype)
        b_buf[:n] = nonzero(gen, (n,), dtype)
        b = b_buf.to(device)[:n]
    return x_buf.to(device)[:m], w_buf.to(device)[:n, :k], b


def linear_f64(x, w, b):
    out = x.double() @ w.double().T
    return out + b.double() if b is not None else out


configs = st.builds(LinearConfig, block_n=st.sampled_from([16, 32, 64]), block_k=st.sampled_from([16, 32, 64]),
                    num_warps=st.sampled_from([1, 2, 4]), num_stages=st.sampled_from([1, 2, 3]))
# The streaming kernel's cases (tests of its variants take these and add their own): rows, reduction length,
# dtype, bias, tiling, seed; output columns, and padding rows of x (row_pads), drawn by each test.
stream_cases = dict(m=st.integers(1, MAX_STREAM_ROWS), k=st.one_of(st.integers(1, 200), st.sampled_from([32, 64, 128])),
                    dtype=st.sampled_from(DTYPES), bias=st.booleans(), config=configs,
                    seed=st.integers(0, 2**31 - 1))
stream_columns = st.one_of(st.integers(1, 150), st.sampled_from([16, 64, 96]))
row_pads = st.sampled_from([0, 8])


@given(n=stream_columns, row_pad=row_pads, **stream_cases)
def test_stream_kernel_matches_float64_reference(m, n, k, dtype, bias, row_pad, config, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w, b = poisoned_operands(gen, m, n, k, dtype, bias, row_pad, TRITON_DEVICE)
    out = linear_stream_triton(x, w, b, config=config)
    assert out.shape == (m, n) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, linear_f64(x, w, b), MATMUL, dtype, msg=f"{config}")


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("m", [1, 2, MAX_STREAM_ROWS, MAX_STREAM_ROWS + 1, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_float64_reference(device, m, dtype):
    """The registered op on both sides of the streaming kernel's row limit, with a leading batch dim as in the
    compiled HF graph ([1, tokens, hidden])."""
    gen = torch.Generator().manual_seed(m)
    n, k = 72, 136
    x, w, b = poisoned_operands(gen, m, n, k, dtype, True, 8, device)
    out = torch.ops.cinfer.linear(x[None], w, b)
    assert out.shape == (1, m, n) and out.dtype == dtype and out.is_contiguous()
    assert_close(out[0], linear_f64(x, w, b), MATMUL, dtype)
    out = torch.ops.cinfer.linear(x, w, None)
    assert_close(out, linear_f64(x, w, None), MATMUL, dtype)


def test_zero_rows():
    w = torch.randn(8, 16)
    assert linear_stream_triton(torch.empty(0, 16, device=TRITON_DEVICE), w.to(TRITON_DEVICE)).shape == (0, 8)
    assert torch.ops.cinfer.linear(torch.empty(2, 0, 16), w, None).shape == (2, 0, 8)


@pytest.mark.parametrize("op", [torch.ops.cinfer.linear.default, torch.ops.cinfer.linear_silu_mul.default],
                         ids=["linear", "linear_silu_mul"])
def test_opcheck(op):
    gen = torch.Generator().manual_seed(0)
    for device in OP_DEVICES:
        x, w, b = poisoned_operands(gen, 3, 24, 40, torch.float32, True, 0, device)
        torch.library.opcheck(op, (x, w, b))
        torch.library.opcheck(op, (x[None], w, None))


def test_bad_input_is_named():
    x, w = torch.randn(2, 16, device=TRITON_DEVICE), torch.randn(8, 16, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="in_features"):
        linear_stream_triton(torch.randn(2, 12, device=TRITON_DEVICE), w)
    with pytest.raises(ValueError, match="2-D"):
        linear_stream_triton(x, w[None])
    with pytest.raises(ValueError, match="bias"):
        linear_stream_triton(x, w, torch.randn(7, device=TRITON_DEVICE))
    with pytest.raises(ValueError, match="weight is torch.float16"):
        linear_stream_triton(x, w.half())
    with pytest.raises(ValueError, match="at most"):
        linear_stream_triton(torch.randn(MAX_STREAM_ROWS + 1, 16, device=TRITON_DEVICE), w)


def test_config_choice(monkeypatch):
    """Few rows stream (with the shape's own config, if it has one); more rows, shapes mapped to None and
    STREAM_ROWS = 0 go to cuBLAS."""
    mod = importlib.import_module("cinfer_ops.linear")  # the module; the package's ``linear`` is the op

    special = LinearConfig(64, 256, 4, 3)
    monkeypatch.setattr(mod, "LINEAR_CONFIGS", {(96, 64): special, (32, 64): None})
    assert pick_linear_config(1, 48, 64) == mod.DEFAULT_LINEAR_CONFIG
    assert pick_linear_config(MAX_STREAM_ROWS, 96, 64) == special
    assert pick_linear_config(2, 32, 64) is None
    assert pick_linear_config(MAX_STREAM_ROWS + 1, 48, 64) is None
    monkeypatch.setattr(mod, "STREAM_ROWS", 0)
    assert pick_linear_config(1, 48, 64) is None


def test_config_table_follows_the_gpu(monkeypatch):
    """Each GPU model its own table (matched on the device name), the H100's for other GPUs and on CPU, and
    LINEAR_CONFIGS, when set, for every GPU."""
    mod = importlib.import_module("cinfer_ops.linear")
    assert mod._gpu_table("NVIDIA H200") is mod.H200_LINEAR_CONFIGS
    assert mod._gpu_table("NVIDIA H100 80GB HBM3") is mod.H100_LINEAR_CONFIGS
    assert mod._gpu_table("NVIDIA A100-SXM4-80GB") is mod.H100_LINEAR_CONFIGS
    assert mod.linear_configs(torch.device("cpu")) is mod.H100_LINEAR_CONFIGS
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert mod.linear_configs(torch.device("cuda", 0)) is mod.H200_LINEAR_CONFIGS
    assert pick_linear_config(2, 6144, 4096, torch.device("cuda", 0)) == mod.H200_LINEAR_CONFIGS[(6144, 4096)]
    assert pick_linear_config(2, 6144, 4096) == mod.H100_LINEAR_CONFIGS[(6144, 4096)]
    override = {(6144, 4096): None}
    monkeypatch.setattr(mod, "LINEAR_CONFIGS", override)
    assert mod.linear_configs(torch.device("cuda", 0)) is override
    assert pick_linear_config(2, 6144, 4096, torch.device("cuda", 0)) is None


def test_load_linear_configs(tmp_path):
    path = tmp_path / "tune_linear.json"
    path.write_text('{"linear_configs": {"6144,4096": [64, 256, 4, 3], "4096,4096": null}}')
    mod = importlib.import_module("cinfer_ops.linear")
    assert mod.load_linear_configs(str(path)) == {(6144, 4096): LinearConfig(64, 256, 4, 3), (4096, 4096): None}


@pytest.mark.gpu
def test_dependent_chain_in_cuda_graph():
    """Each launch reads what the kernel before it wrote (rms_norm -> linear -> linear, as in a decode step), inside a
    CUDA graph replayed over new inputs, against the same chain run eagerly with cuBLAS."""
    gen = torch.Generator().manual_seed(0)
    k, n1, n2 = 4096, 6144, 4096
    x = nonzero(gen, (2, k), torch.bfloat16).cuda()
    norm_w = nonzero(gen, (k,), torch.bfloat16).cuda()
    w1 = (nonzero(gen, (n1, k), torch.bfloat16) / 16).cuda()
    w2 = (nonzero(gen, (n2, n1), torch.bfloat16) / 16).cuda()

    def step():
        h = torch.ops.cinfer.rms_norm(x, norm_w, 1e-5)
        return torch.ops.cinfer.linear(torch.ops.cinfer.linear(h, w1, None), w2, None)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        x.copy_(nonzero(torch.Generator().manual_seed(seed + 1), (2, k), torch.bfloat16))
        graph.replay()
        h = torch.ops.cinfer.rms_norm(x, norm_w, 1e-5)
        expected = torch.nn.functional.linear(torch.nn.functional.linear(h, w1), w2)
        torch.testing.assert_close(out.float(), expected.float(), atol=0.1, rtol=2e-2)


# --- cinfer::linear_silu_mul: the gate/up projection with the activation in the kernel's epilogue -----------------

def gated_f64(x, w, b):
    """silu(gate) * up of the float64 projection, gate the first half of its columns."""
    gate, up = linear_f64(x, w, b).chunk(2, -1)
    return gate / (1 + torch.exp(-gate)) * up


@given(half=st.one_of(st.integers(1, 80), st.sampled_from([8, 32, 48])), row_pad=row_pads, **stream_cases)
def test_gated_stream_kernel_matches_float64_reference(m, half, k, dtype, bias, row_pad, config, seed):
    """Weight rows past 2 * half, padding columns and x rows past m are NaN (poisoned_operands)."""
    gen = torch.Generator().manual_seed(seed)
    x, w, b = poisoned_operands(gen, m, 2 * half, k, dtype, bias, row_pad, TRITON_DEVICE)
    w = w / k ** 0.5  # projections of order 1, where the activation's rounding is what the tolerance covers
    out = linear_stream_triton(x, w, b, config=config, gated=True)
    assert out.shape == (m, half) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, gated_f64(x, w, b), GATED_MATMUL, dtype, msg=f"{config}")


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("m", [1, 2, MAX_STREAM_ROWS, MAX_STREAM_ROWS + 1, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_silu_mul_op_matches_float64_reference(device, m, dtype):
    """Both sides of the streaming kernel's row limit (cuBLAS + silu_mul above it), with a leading batch dim, and
    equal within one rounding to the two ops it replaces."""
    gen = torch.Generator().manual_seed(m)
    half, k = 72, 136
    x, w, b = poisoned_operands(gen, m, 2 * half, k, dtype, True, 8, device)
    w = w / k ** 0.5
    out = torch.ops.cinfer.linear_silu_mul(x[None], w, b)
    assert out.shape == (1, m, half) and out.dtype == dtype and out.is_contiguous()
    assert_close(out[0], gated_f64(x, w, b), GATED_MATMUL, dtype)
    gate, up = torch.ops.cinfer.linear(x, w, None).chunk(2, -1)
    assert_close(torch.ops.cinfer.linear_silu_mul(x, w, None), torch.ops.cinfer.silu_mul(gate, up), ELEMENTWISE, dtype)


def test_linear_silu_mul_bad_input_is_named():
    x, w = torch.randn(2, 16), torch.randn(9, 16)
    with pytest.raises(ValueError, match="even"):
        torch.ops.cinfer.linear_silu_mul(x, w, None)
    with pytest.raises(ValueError, match="even"):
        linear_stream_triton(x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), gated=True)
    with pytest.raises(ValueError, match="in_features"):
        torch.ops.cinfer.linear_silu_mul(torch.randn(2, 12), w[:8], None)


def test_early_dependents(monkeypatch):
    """A one-wave grid (at most one program per SM; 8 on CPU) lets the next kernel launch before its K loop (PDL):
    every program from 0 on; a larger grid, or EARLY_DEPENDENTS off, none (from ``programs`` on)."""
    mod = importlib.import_module("cinfer_ops.linear")
    cpu = torch.device("cpu")
    assert mod.EARLY_DEPENDENTS  # on by default
    monkeypatch.setattr(mod, "EARLY_DEPENDENTS", True)
    assert [mod._early_from(p, cpu) for p in (1, 8, 9, 40)] == [0, 0, 9, 40]
    monkeypatch.setattr(mod, "EARLY_DEPENDENTS", False)
    assert [mod._early_from(p, cpu) for p in (1, 8, 40)] == [1, 8, 40]
