"""cinfer::linear_add_rms_stats, cinfer::rms_stats_linear[_silu_mul] (an RMSNorm split across the projections
around it) and their kernels against independent float64 references.

Inputs are random and never zero. What the kernels must not read (x, residual and sumsq rows past M, weight rows
past N, the padding after each weight row, norm-weight and bias entries past N) is NaN.
"""
import importlib

import pytest
import torch
from hypothesis import given, strategies as st

from cinfer_ops.linear import (MAX_STREAM_ROWS, STATS_CHUNK, LinearConfig, linear_add_rms_stats_triton,
                               rms_stats_linear_triton)
from cinfer_ops.rms_norm import add_rms_stats_triton, rms_scale_triton
from tests.conftest import TRITON_DEVICE
from tests.ops.test_linear import (DTYPES, OP_DEVICES, linear_f64, nonzero, poisoned_operands, row_pads, stream_cases,
                                   stream_columns)
from tests.tolerances import ELEMENTWISE, GATED_MATMUL, LOGITS, MATMUL, assert_close

# fp32 sums of squares: the summation order's error only
SUMSQ = (1e-5, 1e-5)


def poisoned(gen, shape, dtype, device, pad_rows=3):
    """A random non-zero tensor of ``shape`` as a view of a buffer with NaN rows (or entries) after it."""
    buf = torch.full((shape[0] + pad_rows, *shape[1:]), float("nan"), dtype=dtype)
    buf[:shape[0]] = nonzero(gen, shape, dtype)
    return buf.to(device)[:shape[0]]


def chunk_sumsq_f64(h: torch.Tensor) -> torch.Tensor:
    """Each STATS_CHUNK columns' sum of h**2 in float64: [..., ceil(N / STATS_CHUNK)]."""
    n = h.shape[-1]
    parts = -(-n // STATS_CHUNK)
    squares = torch.nn.functional.pad(h.double() ** 2, (0, parts * STATS_CHUNK - n))
    return squares.view(*h.shape[:-1], parts, STATS_CHUNK).sum(-1)


def check_stats(scaled, h, sumsq, x, w, b, residual, g, dtype):
    """h against float64 (x @ w^T + b) + residual; scaled and sumsq against float64 functions of the returned h."""
    m, n = h.shape
    assert scaled.shape == h.shape == (m, n) and sumsq.shape == (m, -(-n // STATS_CHUNK))
    assert scaled.dtype == h.dtype == dtype and sumsq.dtype == torch.float32
    assert scaled.is_contiguous() and h.is_contiguous() and sumsq.is_contiguous()
    assert_close(h, linear_f64(x, w, b) + residual.double(), MATMUL, dtype)
    assert_close(scaled, g.double() * h.double(), ELEMENTWISE, dtype)
    torch.testing.assert_close(sumsq.double().cpu(), chunk_sumsq_f64(h).cpu(), atol=SUMSQ[0], rtol=SUMSQ[1])


@given(n=stream_columns, row_pad=row_pads, **stream_cases)
def test_add_rms_stats_kernel_matches_float64_reference(m, n, k, dtype, bias, row_pad, config, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w, b = poisoned_operands(gen, m, n, k, dtype, bias, row_pad, TRITON_DEVICE)
    w = w / k ** 0.5
    residual = poisoned(gen, (m, n), dtype, TRITON_DEVICE)
    g = poisoned(gen, (n,), dtype, TRITON_DEVICE)
    scaled, h, sumsq = linear_add_rms_stats_triton(x, w, b, residual, g, config=config)
    check_stats(scaled, h, sumsq, x, w, b, residual, g, dtype)


def rms_linear_f64(x, sumsq, eps, w, b):
    """rsqrt(sum(sumsq) / K + eps) * (x @ w^T) + b in float64."""
    rstd = torch.rsqrt(sumsq.double().sum(-1, keepdim=True) / x.shape[-1] + eps)
    return linear_f64(x, w, None) * rstd + (b.double() if b is not None else 0)


def stats_operands(gen, m, k, dtype, device):
    """scaled [m, k] and its sumsq [m, ceil(k / STATS_CHUNK)] (of a random h, as linear_add_rms_stats writes),
    each followed by NaN rows."""
    h = nonzero(gen, (m, k), torch.float64) * 3
    sumsq = torch.full((m + 2, -(-k // STATS_CHUNK)), float("nan"), dtype=torch.float32)
    sumsq[:m] = chunk_sumsq_f64(h).float()
    return poisoned(gen, (m, k), dtype, device), sumsq.to(device)[:m]


@given(n=stream_columns, gated=st.booleans(), **stream_cases)
def test_rms_stats_linear_kernel_matches_float64_reference(m, n, k, dtype, bias, gated, config, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 2 * n if gated else n
    x, w, b = poisoned_operands(gen, m, n, k, dtype, bias, 8, TRITON_DEVICE)
    w = w / k ** 0.5
    scaled, sumsq = stats_operands(gen, m, k, dtype, TRITON_DEVICE)
    out = rms_stats_linear_triton(scaled, sumsq, 1e-5, w, b, config=config, gated=gated)
    assert out.shape == (m, n // 2 if gated else n) and out.dtype == dtype and out.is_contiguous()
    expected = rms_linear_f64(scaled, sumsq, 1e-5, w, b)
    marked = torch.arange(m) % 3 == 1  # rows marked normalized (a negative sumsq): scaled by 1
    if marked.any():
        sumsq[marked.to(sumsq.device)] = -1.0
        expected[marked] = linear_f64(scaled, w, b)[marked]
        out = rms_stats_linear_triton(scaled, sumsq, 1e-5, w, b, config=config, gated=gated)
    if gated:
        gate, up = expected.chunk(2, -1)
        expected = gate / (1 + torch.exp(-gate)) * up
    assert_close(out, expected, GATED_MATMUL if gated else MATMUL, dtype, msg=f"{config}")


@pytest.mark.parametrize("rows, hidden", [(1, 8), (5, 40), (3, 96), (1100, 40)])  # 1100: rms_norm's many-rows variant
@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_kernels_match_float64_reference(rows, hidden, dtype):
    """The statistics and scaling kernels of the cuBLAS path (more rows than the streaming kernel takes)."""
    gen = torch.Generator().manual_seed(rows * hidden)
    y, residual = (poisoned(gen, (rows, hidden), dtype, TRITON_DEVICE) for _ in range(2))
    g = poisoned(gen, (hidden,), dtype, TRITON_DEVICE)
    scaled, h, sumsq = add_rms_stats_triton(y, residual, g, STATS_CHUNK)
    assert_close(h, y.double() + residual.double(), ELEMENTWISE, dtype)
    assert_close(scaled, g.double() * h.double(), ELEMENTWISE, dtype)
    torch.testing.assert_close(sumsq.double().cpu(), chunk_sumsq_f64(h).cpu(), atol=SUMSQ[0], rtol=SUMSQ[1])
    scaled, h, sumsq = scaled[:9], h[:9], sumsq[:9]  # one program a row: a few rows are enough
    out = rms_scale_triton(scaled, sumsq, 1e-6)
    rstd = torch.rsqrt(chunk_sumsq_f64(h).sum(-1, keepdim=True) / hidden + 1e-6)
    assert out.shape == scaled.shape and out.dtype == dtype
    assert_close(out, scaled.double() * rstd, ELEMENTWISE, dtype)
    # normalize: the whole norm (exactly fused_add_rms_norm's kernel) and -1 in sumsq, which the scaling honours
    normed, h2, marks = add_rms_stats_triton(y, residual, g, STATS_CHUNK, 1e-6, normalize=True)
    expected, expected_h = torch.ops.cinfer.fused_add_rms_norm(y.cpu(), residual.cpu(), g.cpu(), 1e-6)
    assert_close(normed, expected, ELEMENTWISE, dtype)
    assert_close(h2, expected_h, ELEMENTWISE, dtype)
    assert marks.shape == (rows, sumsq.shape[-1]) and (marks == -1).all()
    assert torch.equal(rms_scale_triton(normed[:9], marks[:9], 1e-6), normed[:9])


def norm_then_linear_f64(y, residual, g, eps, w2, b2):
    """HF: h = y + residual; x = g * (h * rsqrt(mean(h**2) + eps)); x @ w2^T + b2, all in float64."""
    h = y.double() + residual.double()
    x = g.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return linear_f64(x, w2, b2)


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("m", [1, 3, MAX_STREAM_ROWS, MAX_STREAM_ROWS + 1, 40])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "cublas"])
def test_split_norm_is_the_norm_between_two_projections(device, m, dtype, streamed, monkeypatch):
    """The two ops in a row compute HF's residual add, RMSNorm and the next projection (plain and gated), on both
    sides of the streaming kernel's row limit, with a leading batch dim as in the compiled graph. ``cublas``: every
    projection on cuBLAS (STREAM_ROWS = 0), so few rows take the statistics and scaling kernels instead."""
    if not streamed:
        if device != "cuda":
            pytest.skip("the CPU implementation has one path")
        monkeypatch.setattr(importlib.import_module("cinfer_ops.linear"), "STREAM_ROWS", 0)
    gen = torch.Generator().manual_seed(m)
    k, n, n2 = 136, 96, 72
    x, w, b = poisoned_operands(gen, m, n, k, dtype, True, 8, device)
    w = w / k ** 0.5
    residual = poisoned(gen, (m, n), dtype, device)
    g = poisoned(gen, (n,), dtype, device)
    _, w2, b2 = poisoned_operands(gen, m, n2, n, dtype, True, 0, device)
    w2 = w2 / n ** 0.5
    scaled, h, sumsq = torch.ops.cinfer.linear_add_rms_stats(x[None], w, b, residual[None], g, 1e-5)
    assert scaled.shape == h.shape == (1, m, n) and sumsq.shape == (1, m, n // STATS_CHUNK)
    if m <= MAX_STREAM_ROWS:
        check_stats(scaled[0], h[0], sumsq[0], x, w, b, residual, g, dtype)
    else:  # more rows than the streaming kernel takes: the norm itself, and the mark of normalized rows
        assert_close(h[0], linear_f64(x, w, b) + residual.double(), MATMUL, dtype)
        assert torch.equal(scaled, torch.ops.cinfer.rms_norm(h, g, 1e-5))
        assert (sumsq == -1).all()
    out = torch.ops.cinfer.rms_stats_linear(scaled, sumsq, 1e-5, w2, b2)
    assert out.shape == (1, m, n2) and out.dtype == dtype and out.is_contiguous()
    y = linear_f64(x, w, b).to(dtype)  # HF rounds the projection before the residual add
    expected = norm_then_linear_f64(y, residual, g, 1e-5, w2, b2)
    assert_close(out[0], expected, LOGITS, dtype)  # the norm's roundings differ from HF's: see cinfer_ops.norm_linear
    gated = torch.ops.cinfer.rms_stats_linear_silu_mul(scaled, sumsq, 1e-5, w2[:n2 // 2 * 2], b2)
    gate, up = expected.chunk(2, -1)
    assert gated.shape == (1, m, n2 // 2)
    assert_close(gated[0], gate / (1 + torch.exp(-gate)) * up, LOGITS, dtype)


def test_zero_rows():
    x, w, g = torch.randn(0, 16), torch.randn(32, 16), torch.randn(32)
    scaled, h, sumsq = torch.ops.cinfer.linear_add_rms_stats(x, w, None, torch.randn(0, 32), g, 1e-5)
    assert scaled.shape == h.shape == (0, 32) and sumsq.shape == (0, 2)
    assert torch.ops.cinfer.rms_stats_linear(scaled, sumsq, 1e-5, torch.randn(8, 32), None).shape == (0, 8)
    out = linear_add_rms_stats_triton(x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), None,
                                      torch.randn(0, 32, device=TRITON_DEVICE), g.to(TRITON_DEVICE))
    assert [t.shape for t in out] == [(0, 32), (0, 32), (0, 2)]


@pytest.mark.parametrize("op", ["linear_add_rms_stats", "rms_stats_linear", "rms_stats_linear_silu_mul"])
def test_opcheck(op):
    gen = torch.Generator().manual_seed(0)
    for device in OP_DEVICES:
        x, w, b = poisoned_operands(gen, 3, 24, 40, torch.float32, True, 0, device)
        if op == "linear_add_rms_stats":
            residual, g = poisoned(gen, (3, 24), torch.float32, device), poisoned(gen, (24,), torch.float32, device)
            args = [(x, w, b, residual, g, 1e-5), (x[None], w, None, residual[None], g, 1e-6)]
        else:
            scaled, sumsq = stats_operands(gen, 3, 40, torch.float32, device)
            args = [(scaled, sumsq, 1e-5, w, b), (scaled[None], sumsq[None], 1e-6, w, None)]
        for a in args:
            torch.library.opcheck(getattr(torch.ops.cinfer, op).default, a)


def test_bad_input_is_named():
    x, w, g = torch.randn(2, 16), torch.randn(32, 16), torch.randn(32)
    with pytest.raises(ValueError, match="residual"):
        torch.ops.cinfer.linear_add_rms_stats(x, w, None, torch.randn(2, 16), g, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        torch.ops.cinfer.linear_add_rms_stats(x, w, None, torch.randn(2, 32, dtype=torch.float16), g, 1e-5)
    with pytest.raises(ValueError, match="norm_weight"):
        torch.ops.cinfer.linear_add_rms_stats(x, w, None, torch.randn(2, 32), torch.randn(16), 1e-5)
    scaled, sumsq = torch.randn(2, 32), torch.rand(2, 2)
    with pytest.raises(ValueError, match="sumsq"):
        torch.ops.cinfer.rms_stats_linear(scaled, sumsq[:, :1], 1e-5, torch.randn(8, 32), None)
    with pytest.raises(ValueError, match="sumsq"):
        torch.ops.cinfer.rms_stats_linear(scaled, sumsq.double(), 1e-5, torch.randn(8, 32), None)
    with pytest.raises(ValueError, match="even"):
        torch.ops.cinfer.rms_stats_linear_silu_mul(scaled, sumsq, 1e-5, torch.randn(9, 32), None)
    with pytest.raises(ValueError, match="block_n"):
        linear_add_rms_stats_triton(x, w, None, torch.randn(2, 32), g, config=LinearConfig(block_n=24))


@pytest.mark.gpu
def test_layer_chain_in_cuda_graph():
    """A decode layer's projections with both norms split, each kernel reading what the one before it wrote (PDL),
    in a CUDA graph replayed over new inputs, against HF's order of ops run eagerly."""
    gen = torch.Generator().manual_seed(0)
    hidden, inter = 4096, 14336
    dtype = torch.bfloat16
    weights = {name: (nonzero(gen, shape, dtype) / shape[1] ** 0.5).cuda() for name, shape in
               (("o", (hidden, hidden)), ("gate_up", (2 * inter, hidden)), ("down", (hidden, inter)),
                ("qkv", (6144, hidden)))}
    g1, g2 = (nonzero(gen, (hidden,), dtype).cuda() for _ in range(2))
    a, residual = nonzero(gen, (2, hidden), dtype).cuda(), (3 * nonzero(gen, (2, hidden), dtype)).cuda()

    def step():
        scaled, h, sumsq = torch.ops.cinfer.linear_add_rms_stats(a, weights["o"], None, residual, g1, 1e-5)
        act = torch.ops.cinfer.rms_stats_linear_silu_mul(scaled, sumsq, 1e-5, weights["gate_up"], None)
        scaled, h, sumsq = torch.ops.cinfer.linear_add_rms_stats(act, weights["down"], None, h, g2, 1e-5)
        return torch.ops.cinfer.rms_stats_linear(scaled, sumsq, 1e-5, weights["qkv"], None)

    def reference():
        x, h = torch.ops.cinfer.fused_add_rms_norm(torch.nn.functional.linear(a, weights["o"]), residual, g1, 1e-5)
        gate, up = torch.nn.functional.linear(x, weights["gate_up"]).chunk(2, -1)
        x, h = torch.ops.cinfer.fused_add_rms_norm(torch.nn.functional.linear(torch.nn.functional.silu(gate) * up,
                                                                               weights["down"]), h, g2, 1e-5)
        return torch.nn.functional.linear(x, weights["qkv"])

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        a.copy_(nonzero(torch.Generator().manual_seed(seed + 1), (2, hidden), dtype))
        graph.replay()
        torch.testing.assert_close(out.float(), reference().float(), atol=0.1, rtol=5e-2)
