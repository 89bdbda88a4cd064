"""cinfer::rms_norm_linear and cinfer::fused_add_rms_norm_linear: the streaming kernel with its norm prologue (through
the interpreter on CPU) and the registered ops, against an independent float64 reference and against the unfolded
ops (a norm, then a linear).

Inputs are random and never zero. The x / residual rows and columns the kernel must not read (past M, the padding
between strided rows, past K of the norm weight) are NaN: a single read of one would poison an output. Projection
weights are scaled by 1/sqrt(K), as in a real model, so outputs are O(1) and the tolerances mean the same at every K.
"""
import pytest
import torch
from hypothesis import given, strategies as st

from cinfer_ops.linear import MAX_STREAM_ROWS, STREAM_ROWS, LinearConfig, linear_stream_triton, pick_linear_config
from cinfer_ops.norm_linear import fused_add_rms_norm_linear_triton, rms_norm_linear_triton
from cinfer_ops.rms_norm import fused_add_rms_norm_triton, rms_norm_triton
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import ELEMENTWISE, MATMUL, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP_DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]
EPS = 1e-5


def nonzero(gen: torch.Generator, shape: tuple, dtype: torch.dtype, low: float = 0.1, high: float = 1.0):
    """Random signs times magnitudes in [low, high)."""
    magnitude = torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
    return (sign * magnitude).to(dtype)


def operands(gen, m, n, k, dtype, row_pad, device):
    """x and residual [m, k] as views of NaN-filled buffers (NaN rows after them, ``row_pad`` NaN columns after each
    row), norm_weight [k] followed by NaN, weight [n, k] (contiguous)."""
    def rows():
        buf = torch.full((m + 3, k + row_pad), float("nan"), dtype=dtype)
        buf[:m, :k] = nonzero(gen, (m, k), dtype)
        return buf.to(device)[:m, :k]

    x, residual = rows(), rows()
    norm_buf = torch.full((k + 5,), float("nan"), dtype=dtype)
    norm_buf[:k] = nonzero(gen, (k,), dtype, 0.25, 2.0)
    weight = (nonzero(gen, (n, k), torch.float64) / k ** 0.5).to(dtype)
    return x, residual, norm_buf.to(device)[:k], weight.to(device)


def norm_linear_f64(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(rms_norm(h)) in float64, keeping the norm's two roundings to h.dtype (HF LlamaRMSNorm's cast before
    the weight multiply, and the norm's output dtype), which the folded kernel must reproduce."""
    hd = h.double().cpu()
    normed = (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    normed = (norm_weight.double().cpu() * normed.double()).to(h.dtype)
    return normed.double() @ weight.double().cpu().T


configs = st.builds(LinearConfig, block_n=st.sampled_from([16, 32, 64]), block_k=st.sampled_from([16, 32, 64]),
                    num_warps=st.sampled_from([1, 2, 4]), num_stages=st.sampled_from([1, 2, 3]))


@given(m=st.integers(1, MAX_STREAM_ROWS), n=st.one_of(st.integers(1, 150), st.sampled_from([16, 64, 96])),
       k=st.one_of(st.integers(1, 200), st.sampled_from([32, 64, 128])), dtype=st.sampled_from(DTYPES),
       add=st.booleans(), row_pad=st.sampled_from([0, 8]), config=configs, seed=st.integers(0, 2**31 - 1))
def test_stream_kernel_matches_float64_reference(m, n, k, dtype, add, row_pad, config, seed):
    gen = torch.Generator().manual_seed(seed)
    x, residual, norm_weight, weight = operands(gen, m, n, k, dtype, row_pad, TRITON_DEVICE)
    x_before, residual_before = x.clone(), residual.clone()
    msg = f"{config} m={m} n={n} k={k} {dtype} add={add}"
    if add:
        out, new_residual = fused_add_rms_norm_linear_triton(x, residual, norm_weight, EPS, weight, config=config)
        assert new_residual.shape == (m, k) and new_residual.dtype == dtype and new_residual.is_contiguous()
        assert_close(new_residual, x.double() + residual.double(), ELEMENTWISE, dtype, msg="new_residual " + msg)
        # the sum exactly as cinfer.fused_add_rms_norm's kernel rounds it
        assert torch.equal(new_residual, fused_add_rms_norm_triton(x, residual, norm_weight, EPS)[1]), msg
        h = new_residual  # the norm is checked on the sum the op produced (one rounding, not compounded)
    else:
        out = rms_norm_linear_triton(x, norm_weight, EPS, weight, config=config)
        h = x
    assert out.shape == (m, n) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, norm_linear_f64(h, norm_weight, EPS, weight), MATMUL, dtype, msg=msg)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "the kernel modified its inputs"


# K = 64 is a multiple of BLOCK_K = 32 and K = 100 is not; N = 40 and 37 are not multiples of BLOCK_N = 16.
@pytest.mark.parametrize("m", [1, 3, MAX_STREAM_ROWS])
@pytest.mark.parametrize("n,k", [(40, 64), (37, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add", [False, True])
def test_stream_kernel_matches_the_unfolded_kernels(m, n, k, dtype, add):
    """Against the norm's own kernel followed by the plain streaming kernel with the same config: the same roundings
    in the same places, so the results differ at most by the fp32 summation order of the statistics."""
    config = LinearConfig(16, 32, 2, 2)
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x, residual, norm_weight, weight = operands(gen, m, n, k, dtype, 8, TRITON_DEVICE)
    if add:
        out, new_residual = fused_add_rms_norm_linear_triton(x, residual, norm_weight, EPS, weight, config=config)
        normed, expected_residual = fused_add_rms_norm_triton(x, residual, norm_weight, EPS)
        assert torch.equal(new_residual, expected_residual)
    else:
        out = rms_norm_linear_triton(x, norm_weight, EPS, weight, config=config)
        normed = rms_norm_triton(x, norm_weight, EPS)
    unfolded = linear_stream_triton(normed, weight, config=config)
    assert_close(out, unfolded, MATMUL, dtype)
    if dtype != torch.float32:
        # A skipped rounding of the normalised x (a 16-bit value either way) stays within any tolerance, but moves
        # about half the outputs by an ulp; the statistics' summation order moves a few (92% or more equal, measured).
        equal = (out == unfolded).double().mean().item()
        assert equal >= 0.75, f"only {equal:.0%} of the outputs equal the unfolded kernels'"


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("m", [1, 2, STREAM_ROWS, STREAM_ROWS + 1, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_match_float64_reference_and_the_unfolded_ops(device, m, dtype):
    """The registered ops on both sides of the streaming kernel's row limit, with a leading batch dim as in the
    compiled HF graph ([1, tokens, hidden]), against float64 and against cinfer.rms_norm / fused_add_rms_norm followed
    by cinfer.linear: on CPU both are the same references (equal bit for bit), as are the CUDA ops beyond the row
    limit (the norm's kernel, then cuBLAS)."""
    gen = torch.Generator().manual_seed(m)
    n, k = 72, 136
    x, residual, norm_weight, weight = operands(gen, m, n, k, dtype, 8, device)
    exact = device == "cpu" or pick_linear_config(m, n, k) is None or dtype == torch.float32

    out = torch.ops.cinfer.rms_norm_linear(x[None], norm_weight, EPS, weight)
    assert out.shape == (1, m, n) and out.dtype == dtype and out.is_contiguous()
    assert_close(out[0], norm_linear_f64(x, norm_weight, EPS, weight), MATMUL, dtype)
    unfolded = torch.ops.cinfer.linear(torch.ops.cinfer.rms_norm(x[None], norm_weight, EPS), weight, None)
    if exact:
        assert torch.equal(out, unfolded)
    assert_close(out, unfolded, MATMUL, dtype)

    out, new_residual = torch.ops.cinfer.fused_add_rms_norm_linear(x[None], residual[None], norm_weight, EPS, weight)
    assert out.shape == (1, m, n) and new_residual.shape == (1, m, k)
    assert out.is_contiguous() and new_residual.is_contiguous() and new_residual.dtype == dtype
    normed, expected_residual = torch.ops.cinfer.fused_add_rms_norm(x[None], residual[None], norm_weight, EPS)
    assert torch.equal(new_residual, expected_residual)
    assert_close(out[0], norm_linear_f64(new_residual[0], norm_weight, EPS, weight), MATMUL, dtype)
    unfolded = torch.ops.cinfer.linear(normed, weight, None)
    if exact:
        assert torch.equal(out, unfolded)
    assert_close(out, unfolded, MATMUL, dtype)


def test_zero_rows():
    x = torch.empty(0, 16, device=TRITON_DEVICE)
    norm_weight, weight = torch.ones(16, device=TRITON_DEVICE), torch.randn(8, 16, device=TRITON_DEVICE)
    assert rms_norm_linear_triton(x, norm_weight, EPS, weight).shape == (0, 8)
    out, new_residual = fused_add_rms_norm_linear_triton(x, x, norm_weight, EPS, weight)
    assert out.shape == (0, 8) and new_residual.shape == (0, 16)
    x3 = torch.empty(1, 0, 16)
    assert torch.ops.cinfer.rms_norm_linear(x3, norm_weight.cpu(), EPS, weight.cpu()).shape == (1, 0, 8)
    out, new_residual = torch.ops.cinfer.fused_add_rms_norm_linear(x3, x3, norm_weight.cpu(), EPS, weight.cpu())
    assert out.shape == (1, 0, 8) and new_residual.shape == (1, 0, 16)


def test_no_output_features_still_returns_the_sum():
    x, residual = torch.randn(3, 16, device=TRITON_DEVICE), torch.randn(3, 16, device=TRITON_DEVICE)
    out, new_residual = fused_add_rms_norm_linear_triton(x, residual, torch.ones(16, device=TRITON_DEVICE), EPS,
                                                         torch.empty(0, 16, device=TRITON_DEVICE))
    assert out.shape == (3, 0)
    torch.testing.assert_close(new_residual, x + residual)


def _good_inputs(device):
    """x, residual [2, 16], norm_weight [16], weight [8, 16], fp32."""
    return (torch.randn(2, 16, device=device), torch.randn(2, 16, device=device),
            torch.rand(16, device=device) + 0.5, torch.randn(8, 16, device=device))


def _bad_inputs(device):
    x, residual, norm_weight, weight = _good_inputs(device)
    return [
        ("norm_weight must be", (x, residual, norm_weight[:12], weight)),
        ("in_features", (x, residual, norm_weight, weight[:, :12])),
        ("2-D", (x, residual, norm_weight, weight[None])),
        ("weight is torch.float16", (x, residual, norm_weight, weight.half())),
        ("residual", (x, residual[:1], norm_weight, weight)),
        ("residual", (x, residual.half(), norm_weight, weight)),
        ("hidden size", (x[:, :0], residual[:, :0], norm_weight[:0], weight[:, :0])),
    ]


@pytest.mark.parametrize("device", sorted({"cpu", TRITON_DEVICE} | set(OP_DEVICES)))
def test_bad_input_is_named(device):
    for message, (x, residual, norm_weight, weight) in _bad_inputs(device):
        calls = [lambda: torch.ops.cinfer.fused_add_rms_norm_linear(x, residual, norm_weight, EPS, weight)]
        if message != "residual":
            calls.append(lambda: torch.ops.cinfer.rms_norm_linear(x, norm_weight, EPS, weight))
        if device == TRITON_DEVICE:
            calls.append(lambda: fused_add_rms_norm_linear_triton(x, residual, norm_weight, EPS, weight))
            if message != "residual":
                calls.append(lambda: rms_norm_linear_triton(x, norm_weight, EPS, weight))
        for call in calls:
            with pytest.raises(ValueError, match=message):
                call()
    if device == TRITON_DEVICE:
        _, _, norm_weight, weight = _good_inputs(device)
        with pytest.raises(ValueError, match="at most"):
            rms_norm_linear_triton(torch.randn(MAX_STREAM_ROWS + 1, 16, device=device), norm_weight, EPS, weight)


@pytest.mark.gpu
def test_cuda_ops_run_the_streaming_kernel():
    """On the GPU, few-row calls dispatch to the folded kernel with the shape's config (bit for bit)."""
    gen = torch.Generator().manual_seed(0)
    x, residual, norm_weight, weight = operands(gen, 3, 96, 128, torch.bfloat16, 0, "cuda")
    config = pick_linear_config(3, 96, 128)
    assert torch.equal(torch.ops.cinfer.rms_norm_linear(x, norm_weight, EPS, weight),
                       rms_norm_linear_triton(x, norm_weight, EPS, weight, config=config))
    for got, want in zip(torch.ops.cinfer.fused_add_rms_norm_linear(x, residual, norm_weight, EPS, weight),
                         fused_add_rms_norm_linear_triton(x, residual, norm_weight, EPS, weight, config=config)):
        assert torch.equal(got, want)


# Llama-3-8B's folded projections (fused q/k/v, fused gate/up, lm_head) and Llama-3.2-1B's q/k/v, with their tuned
# LINEAR_CONFIGS (BLOCK_K 128 and 512, 4 and 8 warps).
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096), (128256, 4096), (3072, 2048)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_llama_shapes_match_the_unfolded_ops(n, k, m):
    gen = torch.Generator().manual_seed(m)
    x, residual, norm_weight, weight = operands(gen, m, n, k, torch.bfloat16, 0, "cuda")
    assert pick_linear_config(m, n, k) is not None
    out, new_residual = torch.ops.cinfer.fused_add_rms_norm_linear(x, residual, norm_weight, EPS, weight)
    normed, expected_residual = torch.ops.cinfer.fused_add_rms_norm(x, residual, norm_weight, EPS)
    assert torch.equal(new_residual, expected_residual)
    assert_close(out, torch.ops.cinfer.linear(normed, weight, None), MATMUL, torch.bfloat16)
    out = torch.ops.cinfer.rms_norm_linear(x, norm_weight, EPS, weight)
    assert_close(out, torch.ops.cinfer.linear(torch.ops.cinfer.rms_norm(x, norm_weight, EPS), weight, None), MATMUL,
                 torch.bfloat16)


@pytest.mark.gpu
def test_decode_chain_in_cuda_graph():
    """A decode step's chain (residual add + norm + q/k/v, then the next projection reading both outputs) inside a
    CUDA graph replayed over new inputs, against the unfolded ops run eagerly."""
    gen = torch.Generator().manual_seed(0)
    m, k, n1 = 2, 4096, 6144
    x, residual, norm_weight, w1 = operands(gen, m, n1, k, torch.bfloat16, 0, "cuda")
    w2 = (nonzero(gen, (k, n1), torch.float64) / n1 ** 0.5).to(torch.bfloat16).cuda()

    def step():
        h, new_residual = torch.ops.cinfer.fused_add_rms_norm_linear(x, residual, norm_weight, EPS, w1)
        return torch.ops.cinfer.linear(h, w2, None) + new_residual

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed + 1)
        x.copy_(nonzero(g, (m, k), torch.bfloat16))
        residual.copy_(nonzero(g, (m, k), torch.bfloat16))
        graph.replay()
        normed, new_residual = torch.ops.cinfer.fused_add_rms_norm(x, residual, norm_weight, EPS)
        expected = torch.nn.functional.linear(torch.nn.functional.linear(normed, w1), w2) + new_residual
        torch.testing.assert_close(out.float(), expected.float(), atol=0.1, rtol=2e-2)
