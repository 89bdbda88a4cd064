"""cinfer::kv_cache_write against a per-token Python loop, on caches poisoned with NaN bits.

Each case runs the registered op (its CPU implementation on CPU, the Triton kernel on CUDA) and the Triton launcher
itself (through the interpreter on CPU). Comparisons are bitwise: a written slot must hold exactly its token's K/V,
and every other slot must still hold the poison pattern.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import ELEMENTWISE, assert_close
from cinfer_ops.kv_cache_write import kv_cache_write_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A quiet NaN with a payload no computation produces, so "untouched" can be checked bit for bit.
POISON_BITS = {torch.float32: (torch.int32, 0x7FC0BEEF), torch.float16: (torch.int16, 0x7E5A),
               torch.bfloat16: (torch.int16, 0x7FDA)}
LAYOUTS = ["contiguous", "fused_qkv", "fused_qkv_flat", "head_strided", "head_dim_strided"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(POISON_BITS[t.dtype][0])


def poisoned_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: str) -> torch.Tensor:
    int_dtype, pattern = POISON_BITS[dtype]
    return torch.full((num_blocks, block_size, kv_heads, head_dim), pattern, dtype=int_dtype, device=device).view(dtype)


def expected_cache_bits(poisoned: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The per-token definition: token t's [kv_heads, head_dim] row lands at slot s = slot_mapping[t], i.e.
    cache[s // block_size, s % block_size]; tokens with s == -1 write nothing."""
    expected = bits(poisoned).clone()
    block_size = poisoned.shape[1]
    for t, s in enumerate(slot_mapping.tolist()):
        if s >= 0:
            expected[s // block_size, s % block_size] = bits(rows[t])
    return expected


def random_kv_tensor(gen: torch.Generator, num_tokens: int, num_heads: int, kv_heads: int, head_dim: int,
                     dtype: torch.dtype, layout: str, which: int) -> torch.Tensor:
    """key (which=0) or value (which=1) [num_tokens, kv_heads, head_dim], random, never zero, in the given layout."""
    def rand(*shape):
        magnitude = torch.empty(shape, dtype=torch.float64).uniform_(0.1, 4.0, generator=gen)
        return (magnitude * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)).to(dtype)

    if layout == "contiguous":
        return rand(num_tokens, kv_heads, head_dim)
    if layout == "fused_qkv":  # a slice of a [tokens, q_heads + 2 * kv_heads, head_dim] projection
        start = num_heads + which * kv_heads
        return rand(num_tokens, num_heads + 2 * kv_heads, head_dim)[:, start:start + kv_heads]
    if layout == "fused_qkv_flat":  # a slice of [tokens, (q_heads + 2 * kv_heads) * head_dim], viewed per head
        start = (num_heads + which * kv_heads) * head_dim
        qkv = rand(num_tokens, (num_heads + 2 * kv_heads) * head_dim)
        return qkv[:, start:start + kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    if layout == "head_strided":  # heads further apart than head_dim
        return rand(num_tokens, 2 * kv_heads + 1, head_dim)[:, 1::2]
    if layout == "head_dim_strided":  # head_dim not unit-stride: the launcher must copy
        return rand(num_tokens, kv_heads, 2 * head_dim)[..., which::2]
    raise AssertionError(layout)


@st.composite
def write_cases(draw):
    block_size = draw(st.sampled_from([8, 16, 32, 64, 128]))
    num_blocks = draw(st.integers(1, 6))
    num_slots = num_blocks * block_size
    num_tokens = draw(st.integers(1, min(num_slots, 48)))
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    return dict(
        block_size=block_size, num_blocks=num_blocks, num_tokens=num_tokens, kv_heads=kv_heads,
        num_heads=kv_heads * draw(st.sampled_from([1, 2, 4])),  # MHA and GQA groups of the fused projection
        head_dim=draw(st.sampled_from([16, 64, 80, 128])),
        dtype=draw(st.sampled_from(DTYPES)),
        # Drawn apart so that key and value strides differ (a kernel mixing them up must fail).
        layouts=(draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS))),
        skip_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        # Launch overrides as the benchmark sweep passes them; None keeps the launcher's defaults.
        block=draw(st.sampled_from([None, 16, 64, 256])),
        tokens_per_program=draw(st.sampled_from([None, 1, 4, 16])),
        num_warps=draw(st.sampled_from([None, 1, 4])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=max(settings().max_examples, 60))  # cheap: more cases for the same profile budget
@given(case=write_cases())
def test_kv_cache_write_matches_per_token_loop(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, head_dim, kv_heads = case["dtype"], case["head_dim"], case["kv_heads"]
    key, value = (random_kv_tensor(gen, case["num_tokens"], case["num_heads"], kv_heads, head_dim, dtype, layout, which)
                  for which, layout in enumerate(case["layouts"]))
    num_slots = case["num_blocks"] * case["block_size"]
    slot_mapping = torch.randperm(num_slots, generator=gen)[:case["num_tokens"]]
    skipped = torch.rand(case["num_tokens"], generator=gen) < case["skip_fraction"]
    slot_mapping[skipped] = -1
    cache_shape = (case["num_blocks"], case["block_size"], kv_heads, head_dim)
    poisoned = poisoned_cache(*cache_shape, dtype, "cpu")
    expected_k = expected_cache_bits(poisoned, key, slot_mapping)
    expected_v = expected_cache_bits(poisoned, value, slot_mapping)
    key_bits, value_bits = bits(key).clone(), bits(value).clone()

    def run_op(k, v, kc, vc, sm):
        torch.ops.cinfer.kv_cache_write(k, v, kc, vc, sm)

    def run_triton(k, v, kc, vc, sm):
        kv_cache_write_triton(k, v, kc, vc, sm, block=case["block"], tokens_per_program=case["tokens_per_program"],
                              num_warps=case["num_warps"])

    impls = [("op[cpu]", run_op, "cpu"), ("triton", run_triton, TRITON_DEVICE)]
    if HAS_CUDA:
        impls.append(("op[cuda]", run_op, "cuda"))
    for name, run, device in impls:
        k_cache, v_cache = poisoned.to(device), poisoned.clone().to(device)
        k, v = (_to_device_keep_strides(t, device) for t in (key, value))
        run(k, v, k_cache, v_cache, slot_mapping.to(device))
        assert torch.equal(bits(k_cache.cpu()), expected_k), f"{name}: k_cache differs from the per-token loop, {case}"
        assert torch.equal(bits(v_cache.cpu()), expected_v), f"{name}: v_cache differs from the per-token loop, {case}"
        assert torch.equal(bits(k.cpu()), key_bits) and torch.equal(bits(v.cpu()), value_bits), f"{name} changed key/value"


def _to_device_keep_strides(t: torch.Tensor, device: str) -> torch.Tensor:
    """Copy a view and its whole storage to the device, keeping its strides and offset."""
    base = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage()).to(device)
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_kv_cache_write_converts_to_cache_dtype(cache_dtype):
    gen = torch.Generator().manual_seed(1)
    key = torch.randn(5, 2, 16, generator=gen) + 3.0
    value = torch.randn(5, 2, 16, generator=gen) - 3.0
    slot_mapping = torch.tensor([3, -1, 0, 7, 12])
    for name, run, device in (("op", torch.ops.cinfer.kv_cache_write, "cpu"), ("triton", kv_cache_write_triton, TRITON_DEVICE)):
        k_cache = poisoned_cache(2, 8, 2, 16, cache_dtype, device)
        v_cache = k_cache.clone()
        run(key.to(device), value.to(device), k_cache, v_cache, slot_mapping.to(device))
        written = slot_mapping[slot_mapping >= 0]
        assert_close(k_cache.view(16, 2, 16)[written], key[slot_mapping >= 0].double(), ELEMENTWISE, cache_dtype, msg=name)
        assert_close(v_cache.view(16, 2, 16)[written], value[slot_mapping >= 0].double(), ELEMENTWISE, cache_dtype, msg=name)
        untouched = torch.ones(16, dtype=torch.bool)
        untouched[written] = False
        assert (bits(k_cache.cpu()).view(16, -1)[untouched] == POISON_BITS[cache_dtype][1]).all(), name
        assert (bits(v_cache.cpu()).view(16, -1)[untouched] == POISON_BITS[cache_dtype][1]).all(), name


def test_no_tokens_is_a_no_op():
    k_cache = poisoned_cache(2, 8, 2, 16, torch.float16, TRITON_DEVICE)
    v_cache = k_cache.clone()
    empty = torch.empty(0, 2, 16, dtype=torch.float16, device=TRITON_DEVICE)
    kv_cache_write_triton(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int64, device=TRITON_DEVICE))
    assert (bits(k_cache) == POISON_BITS[torch.float16][1]).all() and (bits(v_cache) == POISON_BITS[torch.float16][1]).all()


@pytest.mark.parametrize("impl", ["op", "triton"])
def test_rejects_bad_arguments(impl):
    run = torch.ops.cinfer.kv_cache_write if impl == "op" else kv_cache_write_triton
    device = "cpu" if impl == "op" else TRITON_DEVICE
    key = torch.randn(4, 2, 16, device=device)
    cache = torch.zeros(2, 8, 2, 16, device=device)
    slots = torch.arange(4, device=device)
    with pytest.raises(ValueError, match="int64"):
        run(key, key, cache, cache.clone(), slots.int())
    with pytest.raises(ValueError, match="kv_heads, head_dim"):
        run(key, key, torch.zeros(2, 8, 1, 16, device=device), torch.zeros(2, 8, 1, 16, device=device), slots)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(2, 16, 2, 16, device=device)[:, ::2]
        run(key, key, strided, strided.clone()[:, :], slots)
    with pytest.raises(ValueError, match="key/value"):
        run(key, key[:3], cache, cache.clone(), slots)
