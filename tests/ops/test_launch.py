"""cinfer_ops.launch: launches run their kernel, except inside ``compile_ahead`` on a GPU, where they only compile it
(in parallel) and launch nothing; leaving the context finishes every compile."""
import pytest
import torch
import triton

from cinfer_ops.launch import compile_ahead
from cinfer_ops.rms_norm import rms_norm_reference, rms_norm_triton
from cinfer_ops.rope_kv_cache_write import rope_kv_cache_write_reference, rope_kv_cache_write_triton
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import ELEMENTWISE, assert_close


def test_compile_ahead_changes_nothing_off_the_gpu():
    """For a CPU device (Triton's interpreter) there is nothing to compile: launches inside the context run."""
    x = torch.randn(3, 40, dtype=torch.float32).to(TRITON_DEVICE) + 0.5
    w = torch.rand(40).to(TRITON_DEVICE) + 0.5
    with compile_ahead(torch.device("cpu")):
        out = rms_norm_triton(x, w, 1e-6)
    assert_close(out, rms_norm_reference(x, w, 1e-6), ELEMENTWISE, torch.float32)


def _rope_inputs(num_tokens: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    heads, kv_heads, head_dim, block = 6, 2, 80, 16  # a head_dim no other test uses: a variant not yet compiled
    rnd = lambda *s: (torch.rand(s, generator=gen) + 0.1).to(dtype).cuda()  # noqa: E731
    q, k, v = rnd(num_tokens, heads, head_dim), rnd(num_tokens, kv_heads, head_dim), rnd(num_tokens, kv_heads, head_dim)
    cos, sin = rnd(num_tokens, head_dim), rnd(num_tokens, head_dim)
    k_cache, v_cache = rnd(8, block, kv_heads, head_dim), rnd(8, block, kv_heads, head_dim)
    slots = torch.randperm(8 * block, generator=gen)[:num_tokens].cuda()
    return q, k, v, cos, sin, k_cache, v_cache, slots


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_compile_ahead_compiles_without_launching(monkeypatch):
    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                        lambda **kwargs: compiled.append(kwargs["repr"]))
    q, k, v, cos, sin, k_cache, v_cache, slots = _rope_inputs(5, torch.bfloat16)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with compile_ahead(q.device):
        rope_kv_cache_write_triton(q, k, v, cos, sin, k_cache, v_cache, slots)
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before), "a kernel ran inside compile_ahead"
    assert compiled, "leaving compile_ahead must finish the compile it started"
    done = len(compiled)

    out = rope_kv_cache_write_triton(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert len(compiled) == done, f"the variant compiled again at launch: {compiled[done:]}"
    k_ref, v_ref = k_before.clone(), v_before.clone()
    expected = rope_kv_cache_write_reference(q, k, v, cos, sin, k_ref, v_ref, slots)
    assert_close(out, expected, ELEMENTWISE, torch.bfloat16)
    assert_close(k_cache, k_ref, ELEMENTWISE, torch.bfloat16)
    assert torch.equal(v_cache, v_ref)
