"""Registration of rms_norm, fused_add_rms_norm and kv_cache_write: torch.library.opcheck (schema, fake kernel,
mutation declarations, AOT dispatch) and tracing under torch.compile(fullgraph=True) as the graph passes use them."""
import pytest
import torch
import torch._dynamo

import cinfer_ops  # noqa: F401  (registers torch.ops.cinfer.*)
from tests.conftest import HAS_CUDA

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
NORM_DTYPES = [torch.float32, torch.bfloat16]


def _rand(gen, *shape, dtype=torch.float32, device="cpu"):
    t = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5  # never zero
    return (t * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)).to(dtype=dtype, device=device)


def norm_samples(device: str, dtype: torch.dtype):
    """(x, weight) pairs: 2-D, the [1, tokens, hidden] the compiled HF graph passes, and a row-strided view."""
    gen = torch.Generator().manual_seed(0)
    weight = _rand(gen, 96, dtype=dtype, device=device)
    yield _rand(gen, 5, 96, dtype=dtype, device=device), weight
    yield _rand(gen, 1, 7, 96, dtype=dtype, device=device), weight
    yield _rand(gen, 6, 128, dtype=dtype, device=device)[:, 16:112], weight


def kv_samples(device: str, dtype: torch.dtype = torch.bfloat16):
    """(key, value, k_cache, v_cache, slot_mapping): contiguous, and key/value sliced from a fused QKV projection."""
    gen = torch.Generator().manual_seed(0)
    num_tokens, kv_heads, head_dim, block_size = 6, 2, 16, 8

    def caches():
        return (torch.full((3, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device),
                torch.full((3, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device))

    slot_mapping = torch.tensor([5, 17, -1, 0, 23, 9], device=device)
    key = _rand(gen, num_tokens, kv_heads, head_dim, dtype=dtype, device=device)
    value = _rand(gen, num_tokens, kv_heads, head_dim, dtype=dtype, device=device)
    yield (key, value, *caches(), slot_mapping)
    qkv = _rand(gen, num_tokens, 4 + 2 * kv_heads, head_dim, dtype=dtype, device=device)
    yield (qkv[:, 4:6], qkv[:, 6:8], *caches(), slot_mapping)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", NORM_DTYPES)
def test_opcheck_rms_norm(device, dtype):
    for x, weight in norm_samples(device, dtype):
        torch.library.opcheck(torch.ops.cinfer.rms_norm.default, (x, weight, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", NORM_DTYPES)
def test_opcheck_fused_add_rms_norm(device, dtype):
    for x, weight in norm_samples(device, dtype):
        residual = torch.flip(x, dims=(-1,)) + 0.25
        torch.library.opcheck(torch.ops.cinfer.fused_add_rms_norm.default, (x, residual, weight, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kv_cache_write(device):
    for args in kv_samples(device):
        torch.library.opcheck(torch.ops.cinfer.kv_cache_write.default, args)


def _compile(fn):
    # aot_eager runs the fake kernels, functionalization and AOT dispatch without code generation (fast on CPU);
    # fullgraph makes any graph break an error.
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_norms_trace_under_compile_with_dynamic_tokens(device):
    def block(hidden, residual, w1, w2):
        # One decoder-layer boundary as the graph passes leave it: norm, projection, fused residual add + norm.
        normed = torch.ops.cinfer.rms_norm(hidden, w1, 1e-6)
        out, new_residual = torch.ops.cinfer.fused_add_rms_norm(normed * 2.0, residual, w2, 1e-6)
        return out + 1.0, new_residual

    compiled = _compile(block)
    gen = torch.Generator().manual_seed(0)
    w1, w2 = _rand(gen, 80, device=device), _rand(gen, 80, device=device)
    for num_tokens in (3, 10, 17):
        hidden, residual = _rand(gen, 1, num_tokens, 80, device=device), _rand(gen, 1, num_tokens, 80, device=device)
        torch._dynamo.mark_dynamic(hidden, 1)
        torch._dynamo.mark_dynamic(residual, 1)
        for got, want in zip(compiled(hidden, residual, w1, w2), block(hidden, residual, w1, w2)):
            assert got.shape == want.shape and got.is_contiguous()
            torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_kv_cache_write_traces_under_compile_and_mutates_caches(device, backend):
    """Key and value are views of a projection computed in the graph; the caches are graph inputs that the compiled
    function must update in place, as the runtime's persistent caches are."""
    num_heads, kv_heads, head_dim = 4, 2, 16

    def attention_inputs(hidden, w_qkv, k_cache, v_cache, slot_mapping):
        qkv = (hidden @ w_qkv).view(hidden.shape[0], num_heads + 2 * kv_heads, head_dim)
        key, value = qkv[:, num_heads:num_heads + kv_heads], qkv[:, num_heads + kv_heads:]
        torch.ops.cinfer.kv_cache_write(key, value, k_cache, v_cache, slot_mapping)
        return qkv[:, :num_heads] * 0.5

    torch._dynamo.reset()
    compiled = torch.compile(attention_inputs, backend=backend, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    w_qkv = _rand(gen, 32, (num_heads + 2 * kv_heads) * head_dim, device=device)
    k_cache = torch.full((4, 8, kv_heads, head_dim), float("nan"), device=device)
    v_cache = k_cache.clone()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    free_slots = torch.randperm(32, generator=gen).tolist()
    for num_tokens in (3, 5, 9):
        hidden = _rand(gen, num_tokens, 32, device=device)
        slots = [free_slots.pop() for _ in range(num_tokens)]
        slots[1] = -1
        slot_mapping = torch.tensor(slots, device=device)
        torch._dynamo.mark_dynamic(hidden, 0)
        torch._dynamo.mark_dynamic(slot_mapping, 0)
        q = compiled(hidden, w_qkv, k_cache, v_cache, slot_mapping)
        want_q = attention_inputs(hidden, w_qkv, expected_k, expected_v, slot_mapping)
        torch.testing.assert_close(q, want_q)
        # Compiled matmuls may round differently from eager: compare values, and NaN exactly where nothing was written.
        torch.testing.assert_close(k_cache, expected_k, equal_nan=True)
        torch.testing.assert_close(v_cache, expected_v, equal_nan=True)
    assert not torch.isnan(k_cache).all(), "nothing was written"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_ops_run_the_triton_kernels():
    """On the GPU, torch.ops.cinfer.* must dispatch to the Triton launchers, not the CPU references."""
    from cinfer_ops.rms_norm import rms_norm_triton

    x = torch.randn(4, 96, device="cuda", dtype=torch.bfloat16) + 0.1
    w = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(torch.ops.cinfer.rms_norm(x, w, 1e-6), rms_norm_triton(x, w, 1e-6))
