"""cinfer::rms_norm and cinfer::fused_add_rms_norm against an independent float64 reference.

Each case runs the registered op (its CPU implementation on CPU, the Triton kernel on CUDA) and the Triton launcher
itself (through the interpreter on CPU). Inputs are random, never zero, with per-row scales spread over decades so
that fp16 squares overflow unless the statistics really are kept in fp32.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import ELEMENTWISE, assert_close
from cinfer_ops.rms_norm import fused_add_rms_norm_triton, rms_norm_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "batched_3d", "row_strided", "column_strided"]
# The registered op runs its CPU implementation on CPU tensors and, on a GPU machine, its CUDA registration too.
OP_DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def rms_norm_f64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm computed in float64, keeping its one rounding to x.dtype before the weight multiply."""
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * normed.to(x.dtype).double()


def random_rows(gen: torch.Generator, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Random signs, magnitudes in [0.1, 2) times a per-row scale in [1e-2, 10**2.5): never zero."""
    magnitude = torch.empty(shape, dtype=torch.float64).uniform_(0.1, 2.0, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
    scale = 10 ** torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(-2.0, 2.5, generator=gen)
    return (sign * magnitude * scale).to(dtype)


def random_weight(gen: torch.Generator, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    magnitude = torch.empty(hidden, dtype=torch.float64).uniform_(0.25, 2.0, generator=gen)
    sign = torch.randint(0, 2, (hidden,), generator=gen, dtype=torch.float64) * 2 - 1
    return (sign * magnitude).to(dtype)


def make_input(gen: torch.Generator, n_rows: int, hidden: int, dtype: torch.dtype, layout: str,
               device: str) -> torch.Tensor:
    """A [.., hidden] tensor with n_rows rows in the given memory layout."""
    if layout == "contiguous":
        return random_rows(gen, (n_rows, hidden), dtype).to(device)
    if layout == "batched_3d":  # [1, tokens, hidden] as the compiled HF graph passes it
        return random_rows(gen, (1, n_rows, hidden), dtype).to(device)
    if layout == "row_strided":  # rows padded apart, e.g. a slice of a wider projection
        return random_rows(gen, (n_rows, hidden + 24), dtype).to(device)[:, 8:8 + hidden]
    if layout == "column_strided":  # hidden not unit-stride: the launcher must copy
        return random_rows(gen, (n_rows, 2 * hidden), dtype).to(device)[:, ::2]
    raise AssertionError(layout)


hidden_sizes = st.one_of(st.sampled_from([16, 80, 96, 128, 576, 1000, 2048]), st.integers(1, 700))
row_counts = st.one_of(st.just(1), st.integers(1, 70))
eps_values = st.one_of(st.sampled_from([1e-5, 1e-6]), st.floats(1e-8, 1e-1))
# None: the launcher's defaults; otherwise overrides as the benchmark sweep passes them.
launch_params = st.tuples(st.sampled_from([None, 1, 2, 4, 8]), st.sampled_from([None, 1, 2, 4, 8]))


def _run_impls(x, weight, eps, rows_per_program, num_warps):
    for device in OP_DEVICES:
        yield f"op[{device}]", torch.ops.cinfer.rms_norm(x.to(device), weight.to(device), eps)
    xt, wt = x.to(TRITON_DEVICE), weight.to(TRITON_DEVICE)
    yield "triton", rms_norm_triton(xt, wt, eps, rows_per_program=rows_per_program, num_warps=num_warps)


@settings(max_examples=max(settings().max_examples, 60))  # cheap: more cases for the same profile budget
@given(n_rows=row_counts, hidden=hidden_sizes, eps=eps_values, dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), params=launch_params, seed=st.integers(0, 2**31 - 1))
def test_rms_norm_matches_float64_reference(n_rows, hidden, eps, dtype, layout, params, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n_rows, hidden, dtype, layout, "cpu")
    weight = random_weight(gen, hidden, dtype)
    x_before = x.clone()
    expected = rms_norm_f64(x, weight, eps)
    for name, out in _run_impls(x, weight, eps, *params):
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous(), name
        assert_close(out, expected, ELEMENTWISE, dtype, msg=f"{name}: {dtype} rows={n_rows} hidden={hidden} {layout}")
    assert torch.equal(x, x_before)


@settings(max_examples=max(settings().max_examples, 60))  # cheap: more cases for the same profile budget
@given(n_rows=row_counts, hidden=hidden_sizes, eps=eps_values, dtype=st.sampled_from(DTYPES),
       layouts=st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)), params=launch_params,
       seed=st.integers(0, 2**31 - 1))
def test_fused_add_rms_norm_matches_float64_reference(n_rows, hidden, eps, dtype, layouts, params, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(gen, n_rows, hidden, dtype, layouts[0], "cpu")
    residual = make_input(gen, n_rows, hidden, dtype, layouts[1], "cpu")
    if x.shape != residual.shape:  # batched_3d vs 2d: give both the 3d shape
        x, residual = x.reshape(1, n_rows, hidden), residual.reshape(1, n_rows, hidden)
    weight = random_weight(gen, hidden, dtype)
    expected_residual = x.double() + residual.double()

    outputs = [(f"op[{device}]", *torch.ops.cinfer.fused_add_rms_norm(x.to(device), residual.to(device),
                                                                      weight.to(device), eps))
               for device in OP_DEVICES]
    xt, rt, wt = (t.to(TRITON_DEVICE) for t in (x, residual, weight))
    xt_before, rt_before = xt.clone(), rt.clone()
    outputs.append(("triton", *fused_add_rms_norm_triton(xt, rt, wt, eps, rows_per_program=params[0],
                                                         num_warps=params[1])))
    assert torch.equal(xt, xt_before) and torch.equal(rt, rt_before), "triton modified its inputs"
    for name, out, new_residual in outputs:
        msg = f"{name}: {dtype} rows={n_rows} hidden={hidden} {layouts}"
        for t in (out, new_residual):
            assert t.shape == x.shape and t.dtype == dtype and t.is_contiguous(), msg
        assert_close(new_residual, expected_residual, ELEMENTWISE, dtype, msg="new_residual " + msg)
        # The sum's rounding is checked above; the norm is checked on the sum the op produced, so one ulp of the
        # interpreter's truncating bf16 conversion is not compounded across three roundings.
        assert_close(out, rms_norm_f64(new_residual.cpu(), weight, eps), ELEMENTWISE, dtype, msg="out " + msg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_equals_hf_llama_rms_norm(dtype):
    """The graph passes swap HF's LlamaRMSNorm for this op: the CPU op must match it bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    hidden = 576
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(random_weight(gen, hidden, dtype))
        x = random_rows(gen, (2, 7, hidden), dtype)
        expected = norm(x)
    assert torch.equal(torch.ops.cinfer.rms_norm(x, norm.weight.detach(), 1e-5), expected)
    out = rms_norm_triton(x.to(TRITON_DEVICE), norm.weight.detach().to(TRITON_DEVICE), 1e-5)
    assert_close(out, expected, ELEMENTWISE, dtype)


@pytest.mark.parametrize("fused", [False, True])
def test_zero_rows(fused):
    x = torch.empty(0, 64, device=TRITON_DEVICE)
    w = torch.ones(64, device=TRITON_DEVICE)
    outs = fused_add_rms_norm_triton(x, x, w, 1e-6) if fused else (rms_norm_triton(x, w, 1e-6),)
    assert all(o.shape == (0, 64) for o in outs)


def test_launcher_rejects_bad_arguments():
    x = torch.randn(4, 64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_triton(x, torch.ones(32, device=TRITON_DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm_triton(x, x.half(), torch.ones(64, device=TRITON_DEVICE), 1e-6)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm_triton(x, torch.ones(64, device=TRITON_DEVICE), 1e-6, rows_per_program=3)
