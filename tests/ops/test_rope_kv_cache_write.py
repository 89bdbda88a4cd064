"""cinfer::rope_kv_cache_write against an independent float64 RoPE reference, on caches poisoned with NaN bits.

Each case runs the registered op (its CPU implementation on CPU, the Triton kernel on CUDA) and the Triton launcher
itself (through the interpreter on CPU). The returned query and the written keys are compared with HF's formula in
float64 (``x * cos + rotate_half(x) * sin``, here spelled per element, without ``cat``); values must land bit for
bit, and every slot no token was mapped to (and the slots of tokens mapped to -1) must still hold the poison bits.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

from cinfer_ops.rope_kv_cache_write import rope_kv_cache_write_triton
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.graph_passes.tiny_models import LLAMA3_ROPE
from tests.ops.test_kv_cache_write import POISON_BITS, _to_device_keep_strides, bits, poisoned_cache
from tests.tolerances import ELEMENTWISE, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QKV_LAYOUTS = ["fused_qkv", "contiguous", "head_strided", "head_dim_strided"]
COS_LAYOUTS = ["tokens", "batched", "row_strided"]


def rope_f64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's RoPE in float64: x [tokens, heads, D], cos/sin [tokens, D] or [1, tokens, D]. Element d pairs with
    d + D/2 (first half: minus sign) or d - D/2 (second half): rotate_half without building it."""
    head_dim = x.shape[-1]
    cos, sin = cos.reshape(-1, head_dim).double()[:, None], sin.reshape(-1, head_dim).double()[:, None]
    d = torch.arange(head_dim)
    partner = (d + head_dim // 2) % head_dim
    sign = torch.where(d < head_dim // 2, -1.0, 1.0).double()
    xd = x.double()
    return xd * cos + sign * xd[..., partner] * sin


def _rand(gen: torch.Generator, shape: tuple, low: float, high: float) -> torch.Tensor:
    """float64, magnitudes in [low, high), random signs: never zero."""
    magnitude = torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=gen)
    return magnitude * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)


def make_qkv(gen, num_tokens, num_heads, kv_heads, head_dim, dtype, layouts):
    """(query, key, value), random and never zero, each in its own memory layout (``layouts``: one name for all three
    or a triple). Drawn apart, the three get different strides, so a kernel that mixes them up fails."""
    layouts = (layouts,) * 3 if isinstance(layouts, str) else layouts
    qkv_width = (num_heads + 2 * kv_heads) * head_dim
    tensors = []
    for which, (heads, layout) in enumerate(zip((num_heads, kv_heads, kv_heads), layouts)):
        if layout == "fused_qkv":  # its columns of a [tokens, (heads + 2 kv_heads) * D] projection, viewed per head
            start = (0, num_heads, num_heads + kv_heads)[which] * head_dim
            qkv = _rand(gen, (num_tokens, qkv_width), 0.1, 4.0).to(dtype)
            tensors.append(qkv[:, start:start + heads * head_dim].view(num_tokens, heads, head_dim))
        elif layout == "contiguous":
            tensors.append(_rand(gen, (num_tokens, heads, head_dim), 0.1, 4.0).to(dtype))
        elif layout == "head_strided":  # heads further apart than head_dim
            tensors.append(_rand(gen, (num_tokens, 2 * heads + 1, head_dim), 0.1, 4.0).to(dtype)[:, 1::2])
        elif layout == "head_dim_strided":  # head_dim not unit-stride: the launcher must copy
            tensors.append(_rand(gen, (num_tokens, heads, 2 * head_dim), 0.1, 4.0).to(dtype)[..., 1::2])
        else:
            raise AssertionError(layout)
    return tuple(tensors)


def make_qkv_fused(gen, num_tokens, num_heads, kv_heads, head_dim, dtype):
    """query, key and value as views of ONE fused projection output, as the compiled graph passes them."""
    qkv = _rand(gen, (num_tokens, (num_heads + 2 * kv_heads) * head_dim), 0.1, 4.0).to(dtype)
    q_cols, kv_cols = num_heads * head_dim, kv_heads * head_dim
    return (qkv[:, :q_cols].view(num_tokens, num_heads, head_dim),
            qkv[:, q_cols:q_cols + kv_cols].view(num_tokens, kv_heads, head_dim),
            qkv[:, q_cols + kv_cols:].view(num_tokens, kv_heads, head_dim))


def make_cos_sin(gen, num_tokens, head_dim, dtype, layouts):
    """Arbitrary per-element cos/sin (halves differ, magnitudes up to 1.5 as with yarn's attention factor), each in
    its layout (one name or a pair): a kernel that pairs the wrong halves, elements or strides must fail."""
    layouts = (layouts,) * 2 if isinstance(layouts, str) else layouts

    def one(layout):
        if layout == "tokens":
            return _rand(gen, (num_tokens, head_dim), 0.1, 1.5).to(dtype)
        if layout == "batched":  # [1, tokens, D] as HF's rotary module returns it
            return _rand(gen, (1, num_tokens, head_dim), 0.1, 1.5).to(dtype)
        if layout == "row_strided":
            return _rand(gen, (num_tokens, 3 * head_dim), 0.1, 1.5).to(dtype)[:, head_dim:2 * head_dim]
        raise AssertionError(layout)
    return one(layouts[0]), one(layouts[1])


@st.composite
def rope_cases(draw):
    block_size = draw(st.sampled_from([8, 16, 32]))
    num_blocks = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        block_size=block_size, num_blocks=num_blocks, kv_heads=kv_heads, dtype=dtype,
        num_tokens=draw(st.integers(1, min(num_blocks * block_size, 12))),
        num_heads=kv_heads * draw(st.sampled_from([1, 2, 4])),  # MHA, GQA groups, MQA (kv_heads 1)
        head_dim=draw(st.sampled_from([16, 64, 80, 128])),
        layouts=draw(st.one_of(st.just("one_projection"), st.tuples(*[st.sampled_from(QKV_LAYOUTS)] * 3))),
        cos_layouts=(draw(st.sampled_from(COS_LAYOUTS)), draw(st.sampled_from(COS_LAYOUTS))),
        cos_dtype=draw(st.sampled_from([torch.float32, dtype])),  # HF casts cos/sin to the model dtype
        skip_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        heads_per_program=draw(st.sampled_from([None, 1, 2, 8])),
        num_warps=draw(st.sampled_from([None, 1, 4])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_case(case, impls):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, head_dim, kv_heads, num_tokens = case["dtype"], case["head_dim"], case["kv_heads"], case["num_tokens"]
    if case["layouts"] == "one_projection":
        query, key, value = make_qkv_fused(gen, num_tokens, case["num_heads"], kv_heads, head_dim, dtype)
    else:
        query, key, value = make_qkv(gen, num_tokens, case["num_heads"], kv_heads, head_dim, dtype, case["layouts"])
    cos, sin = make_cos_sin(gen, num_tokens, head_dim, case["cos_dtype"], case["cos_layouts"])
    num_slots = case["num_blocks"] * case["block_size"]
    slot_mapping = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slot_mapping[torch.rand(num_tokens, generator=gen) < case["skip_fraction"]] = -1
    poisoned = poisoned_cache(case["num_blocks"], case["block_size"], kv_heads, head_dim, dtype, "cpu")

    expected_q, expected_k = rope_f64(query, cos, sin), rope_f64(key, cos, sin)
    written = slot_mapping >= 0
    slots = slot_mapping[written]
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    inputs_bits = [bits(t).clone() for t in (query, key, value, cos, sin)]

    for name, run, device in impls:
        k_cache, v_cache = poisoned.clone().to(device), poisoned.clone().to(device)
        args = [_to_device_keep_strides(t, device) for t in (query, key, value, cos, sin)]
        out = run(*args, k_cache, v_cache, slot_mapping.to(device)).cpu()
        msg = f"{name}, {case}"
        assert out.shape == query.shape and out.dtype == dtype and out.is_contiguous(), msg
        assert_close(out, expected_q, ELEMENTWISE, dtype, msg=f"query: {msg}")
        k_flat, v_flat = (c.cpu().view(num_slots, kv_heads, head_dim) for c in (k_cache, v_cache))
        assert_close(k_flat[slots], expected_k[written], ELEMENTWISE, dtype, msg=f"k_cache: {msg}")
        assert torch.equal(bits(v_flat[slots]), bits(value[written])), f"v_cache: {msg}"
        for cache in (k_flat, v_flat):
            assert (bits(cache[untouched]) == POISON_BITS[dtype][1]).all(), f"a slot nobody owns was written: {msg}"
        for before, t in zip(inputs_bits, args):
            assert torch.equal(bits(t.cpu()), before), f"{name} changed an input"


def _impls(case):
    def run_triton(*args):
        return rope_kv_cache_write_triton(*args, heads_per_program=case["heads_per_program"],
                                          num_warps=case["num_warps"])

    impls = [("op[cpu]", torch.ops.cinfer.rope_kv_cache_write, "cpu"), ("triton", run_triton, TRITON_DEVICE)]
    if HAS_CUDA:
        impls.append(("op[cuda]", torch.ops.cinfer.rope_kv_cache_write, "cuda"))
    return impls


@settings(max_examples=max(settings().max_examples, 40))
@given(case=rope_cases())
def test_rope_kv_cache_write_matches_float64_reference(case):
    run_case(case, _impls(case))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, num_heads, kv_heads", [(64, 8, 2), (128, 32, 8), (80, 4, 4)])
def test_model_shapes(head_dim, num_heads, kv_heads, dtype):
    """Real head counts and head dims (Llama-3-8B: 32/8 x 128) at decode-like and prefill-like token counts."""
    for num_tokens, skip in ((2, 0.5), (9, 0.0)):
        case = dict(block_size=16, num_blocks=2, kv_heads=kv_heads, dtype=dtype, num_tokens=num_tokens,
                    num_heads=num_heads, head_dim=head_dim, layouts="one_projection", cos_layouts="batched",
                    cos_dtype=dtype, skip_fraction=skip, heads_per_program=None, num_warps=None,
                    seed=head_dim * 31 + num_tokens)
        run_case(case, _impls(case))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_matches_hf_apply_rotary_pos_emb(head_dim, dtype):
    """HF's own rotary module (llama3 rope scaling) and ``apply_rotary_pos_emb``, run in float64 on the same
    inputs, are the reference; the query comes back token-major as paged_attention reads it."""
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=4096, rope_parameters=LLAMA3_ROPE)
    gen = torch.Generator().manual_seed(head_dim)
    positions = torch.randint(0, 4096, (1, 7), generator=gen)
    rotary = LlamaRotaryEmbedding(config)
    query, key, value = make_qkv_fused(gen, 7, 4, 2, head_dim, dtype)
    cos, sin = rotary(query.transpose(0, 1)[None], positions)  # [1, 7, D] in the model dtype, as HF passes them
    assert cos.dtype == dtype
    hf_q, hf_k = apply_rotary_pos_emb(query.transpose(0, 1)[None].double(), key.transpose(0, 1)[None].double(),
                                      cos.double(), sin.double())
    expected_q, expected_k = hf_q[0].transpose(0, 1), hf_k[0].transpose(0, 1)
    slot_mapping = torch.tensor([3, 12, -1, 0, 7, 15, 9])
    for name, run, device in _impls(dict(heads_per_program=None, num_warps=None)):
        k_cache = poisoned_cache(2, 8, 2, head_dim, dtype, device)
        v_cache = k_cache.clone()
        args = [_to_device_keep_strides(t, device) for t in (query, key, value, cos, sin)]
        out = run(*args, k_cache, v_cache, slot_mapping.to(device)).cpu()
        assert_close(out, expected_q, ELEMENTWISE, dtype, msg=name)
        written = slot_mapping >= 0
        assert_close(k_cache.cpu().view(16, 2, head_dim)[slot_mapping[written]], expected_k[written], ELEMENTWISE,
                     dtype, msg=name)


def _samples(device: str, dtype: torch.dtype = torch.bfloat16):
    """Arguments for opcheck: contiguous with [tokens, D] fp32 cos/sin, and fused-QKV views with [1, tokens, D]."""
    gen = torch.Generator().manual_seed(0)
    slot_mapping = torch.tensor([5, 17, -1, 0, 23, 9], device=device)

    def caches():
        return tuple(poisoned_cache(3, 8, 2, 16, dtype, device) for _ in range(2))

    query, key, value = make_qkv(gen, 6, 4, 2, 16, dtype, "contiguous")
    cos, sin = make_cos_sin(gen, 6, 16, torch.float32, "tokens")
    yield tuple(t.to(device) for t in (query, key, value, cos, sin)) + caches() + (slot_mapping,)
    query, key, value = (t.to(device) for t in make_qkv_fused(gen, 6, 4, 2, 16, dtype))
    cos, sin = (t.to(device) for t in make_cos_sin(gen, 6, 16, dtype, "batched"))
    yield (query, key, value, cos, sin) + caches() + (slot_mapping,)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    for args in _samples(device):
        torch.library.opcheck(torch.ops.cinfer.rope_kv_cache_write.default, args)


def test_no_tokens():
    k_cache = poisoned_cache(2, 8, 2, 16, torch.float16, TRITON_DEVICE)
    v_cache = k_cache.clone()
    empty = torch.empty(0, 2, 16, dtype=torch.float16, device=TRITON_DEVICE)
    cos = torch.empty(0, 16, device=TRITON_DEVICE)
    out = rope_kv_cache_write_triton(empty, empty, empty, cos, cos, k_cache, v_cache,
                                     torch.empty(0, dtype=torch.int64, device=TRITON_DEVICE))
    assert out.shape == (0, 2, 16)
    for cache in (k_cache, v_cache):
        assert (bits(cache) == POISON_BITS[torch.float16][1]).all()


@pytest.mark.parametrize("impl", ["op", "triton"])
def test_rejects_bad_arguments(impl):
    run = torch.ops.cinfer.rope_kv_cache_write if impl == "op" else rope_kv_cache_write_triton
    device = "cpu" if impl == "op" else TRITON_DEVICE

    def args(**changes):
        base = dict(query=torch.randn(4, 4, 16), key=torch.randn(4, 2, 16), value=torch.randn(4, 2, 16),
                    cos=torch.randn(4, 16), sin=torch.randn(4, 16), k_cache=torch.zeros(2, 8, 2, 16),
                    v_cache=torch.zeros(2, 8, 2, 16), slot_mapping=torch.arange(4))
        base.update(changes)
        # A callable builds its tensor on the device: .to() would make a strided view contiguous.
        return [t(device) if callable(t) else t.to(device) for t in base.values()]

    cases = [
        (dict(query=torch.randn(4, 64)), "query must be"),
        (dict(value=torch.randn(4, 1, 16)), "key/value must both be"),
        (dict(key=torch.randn(3, 2, 16), value=torch.randn(3, 2, 16)), "4 tokens and head_dim 16"),
        (dict(key=torch.randn(4, 2, 8), value=torch.randn(4, 2, 8)), "4 tokens and head_dim 16"),
        (dict(query=torch.randn(4, 4, 15), key=torch.randn(4, 2, 15), value=torch.randn(4, 2, 15),
              cos=torch.randn(4, 15), sin=torch.randn(4, 15), k_cache=torch.zeros(2, 8, 2, 15),
              v_cache=torch.zeros(2, 8, 2, 15)), "head_dim must be even"),
        (dict(cos=torch.randn(4, 8)), r"cos must be \[num_tokens, head_dim\] = \[4, 16\]"),
        (dict(sin=torch.randn(2, 4, 16)), r"sin must be \[num_tokens, head_dim\]"),
        (dict(cos=torch.randn(4, 16, dtype=torch.float64)), "cos must be float32, float16 or bfloat16"),
        (dict(k_cache=torch.zeros(2, 8, 1, 16), v_cache=torch.zeros(2, 8, 1, 16)), "kv_heads, head_dim"),
        (dict(k_cache=lambda d: torch.zeros(2, 16, 2, 16, device=d)[:, ::2]), "caches must both be|contiguous"),
        (dict(k_cache=lambda d: torch.zeros(2, 16, 2, 16, device=d)[:, ::2],
              v_cache=lambda d: torch.zeros(2, 16, 2, 16, device=d)[:, ::2]), "contiguous"),
        (dict(value=torch.randn(4, 2, 16, dtype=torch.bfloat16)), "share one dtype"),
        (dict(k_cache=torch.zeros(2, 8, 2, 16, dtype=torch.float16),
              v_cache=torch.zeros(2, 8, 2, 16, dtype=torch.float16)), "share one dtype"),
        (dict(slot_mapping=torch.arange(4, dtype=torch.int32)), "int64"),
        (dict(slot_mapping=torch.arange(5)), r"slot_mapping must be int64 \[4\]"),
    ]
    for changes, match in cases:
        with pytest.raises(ValueError, match=match):
            run(*args(**changes))
    if impl == "triton":
        with pytest.raises(ValueError, match="heads_per_program must be a power of two"):
            rope_kv_cache_write_triton(*args(), heads_per_program=3)
