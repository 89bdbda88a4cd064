"""``cinfer::rope_paged_attention`` against float64: RoPE of q and k, the cache write, then attention.

Decode steps run the split-KV kernel with the RoPE folded in; other steps the two ops' kernels. Each case poisons
what must not be read (test_paged_attention.build: NaN outside every context, garbage past each block table) and,
in addition, the slot each token writes: the kernel must score the new key and value from registers, never from a
slot its own store may not have reached. Tokens with slot -1 write nothing and attend over the cache as it is.
"""
import math
import unittest.mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cinfer_ops  # noqa: F401  (registers torch.ops.cinfer.*)
from cinfer_ops.paged_attention import DecodeConfig
from cinfer_ops.rope_paged_attention import rope_paged_attention_triton
from tests.conftest import TRITON_DEVICE
from tests.ops.test_paged_attention import (DTYPES, GPU_BLOCK_SIZES, HEADS, SMALL_PREFILL, Case, build,
                                            context_length, decode_config, paged_attention_module,
                                            reference_attention)
from tests.ops.test_rope_kv_cache_write import make_cos_sin, make_qkv, rope_f64
from tests.tolerances import ATTENTION, ELEMENTWISE, assert_close

OP = torch.ops.cinfer.rope_paged_attention.default


def new_slots(block_tables, seq_lens, query_start_loc, block_size):
    """Each query token's own position's slot (the last positions of its sequence's context)."""
    slots = []
    tables = block_tables.cpu().long()
    starts = query_start_loc.cpu().tolist()
    for b, ctx in enumerate(seq_lens.cpu().tolist()):
        q_len = starts[b + 1] - starts[b]
        for pos in range(ctx - q_len, ctx):
            slots.append(int(tables[b, pos // block_size]) * block_size + pos % block_size)
    return slots


def make_inputs(case: Case, device: str, *, no_write: set[int] = frozenset(), qkv_layout="fused_qkv",
                cos_layout="tokens", cos_dtype=torch.float32, seed=0):
    """(args of the op, the untouched caches): build()'s caches and tables, raw q/k/v, cos/sin, and the slot
    mapping (each token's own position; -1 for the tokens in ``no_write`` and the padding rows). The slots that
    will be written hold NaN."""
    query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale = build(case, "cpu")
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_heads, head_dim = query.shape
    kv_heads = k_cache.shape[2]
    query, key, value = make_qkv(gen, num_tokens, num_heads, kv_heads, head_dim, case.dtype, qkv_layout)
    for x in (query, key):  # |x| < 1 (in place: keeps the layout): scores of order 1, so that a one-ulp rounding
        x.div_(4)           # difference of the rotated q or k is not amplified past the tolerance by the softmax
    cos, sin = make_cos_sin(gen, num_tokens, head_dim, cos_dtype, cos_layout)
    slots = new_slots(block_tables, seq_lens, query_start_loc, case.block_size)
    slots = [-1 if t in no_write else s for t, s in enumerate(slots)]
    slot_mapping = torch.tensor(slots + [-1] * (num_tokens - len(slots)), dtype=torch.int64)
    for cache in (k_cache, v_cache):
        cache.view(-1, kv_heads, head_dim)[slot_mapping[slot_mapping >= 0]] = float("nan")
    original = (k_cache.clone(), v_cache.clone())
    args = [query, key, value, cos, sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc]
    if device != "cpu":  # contiguous copies there: the interpreter runs covers the layouts
        args = [t.to(device) for t in args]
    return (*args, scale), original


def expected(args, original):
    """float64 RoPE, each result rounded to the dtype once (as the op defines it), then float64 attention."""
    query, key, value, cos, sin, _, _, slot_mapping, block_tables, seq_lens, query_start_loc, scale = args
    dtype = query.dtype
    k_cache, v_cache = (c.clone().cpu() for c in original)
    kv_heads, head_dim = k_cache.shape[2:]
    cos, sin = cos.cpu(), sin.cpu()
    written = slot_mapping.cpu() >= 0
    slots = slot_mapping.cpu()[written]
    k_cache.view(-1, kv_heads, head_dim)[slots] = rope_f64(key.cpu(), cos, sin).to(dtype)[written]
    v_cache.view(-1, kv_heads, head_dim)[slots] = value.cpu()[written]
    q_rot = rope_f64(query.cpu(), cos, sin).to(dtype)
    out = reference_attention(q_rot, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    return out, k_cache, v_cache


def check(args, original, out, msg=""):
    exp_out, exp_k, exp_v = expected(args, original)
    dtype = args[0].dtype
    real = int(args[10][-1])
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out[:real], exp_out[:real], ATTENTION, dtype, msg=f"output: {msg}")
    written = args[7].cpu()[args[7].cpu() >= 0]
    kv_heads, head_dim = exp_k.shape[2:]
    for name, cache, exp in (("k_cache", args[5], exp_k), ("v_cache", args[6], exp_v)):
        flat, exp_flat = cache.cpu().view(-1, kv_heads, head_dim), exp.view(-1, kv_heads, head_dim)
        assert_close(flat[written], exp_flat[written], ELEMENTWISE, dtype, msg=f"{name}: {msg}")
        untouched = torch.ones(flat.shape[0], dtype=torch.bool)
        untouched[written] = False  # every other slot keeps its value, NaN poison included
        now, before = flat[untouched], exp_flat[untouched]
        assert torch.equal(now.isnan(), before.isnan()), f"{name}: a poisoned slot was written: {msg}"
        assert torch.equal(now[~now.isnan()], before[~before.isnan()]), f"{name}: a slot changed: {msg}"


@st.composite
def decode_step(draw, max_batch=5, head_dims=(16, 64, 80, 128), block_sizes=(8, 16, 32), max_blocks=8):
    """A runtime decode step: one query token per sequence, then 0-2 CUDA-graph padding rows (sequences with no
    query token); some real tokens have slot -1 (nothing written)."""
    bs = draw(st.sampled_from(block_sizes))
    kv_heads, group = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, max_batch))
    padding = draw(st.integers(0, 2))
    q_lens = [1] * batch + [0] * padding
    seq_lens = [draw(context_length(bs, max_blocks)) for _ in q_lens]
    case = Case(q_lens, seq_lens, kv_heads, group, draw(st.sampled_from(head_dims)), bs, draw(st.sampled_from(DTYPES)),
                padding_rows=padding, scale_factor=draw(st.sampled_from([0.5, 1.0, 2.0])),
                seed=draw(st.integers(0, 2**16)))
    no_write = set(draw(st.lists(st.integers(0, batch - 1), max_size=batch // 2)))
    return case, no_write


@settings(max_examples=max(60, settings().max_examples))
@given(step=decode_step(), cfg=decode_config(), qkv_layout=st.sampled_from(["fused_qkv", "contiguous", "head_strided"]),
       cos_layout=st.sampled_from(["tokens", "batched", "row_strided"]), cos_half=st.booleans())
def test_decode_kernel_matches_float64(step, cfg, qkv_layout, cos_layout, cos_half):
    case, no_write = step
    cos_dtype = case.dtype if cos_half else torch.float32
    args, original = make_inputs(case, TRITON_DEVICE, no_write=no_write, qkv_layout=qkv_layout,
                                 cos_layout=cos_layout, cos_dtype=cos_dtype, seed=case.seed)
    assert args[0].shape[0] == args[8].shape[0]  # num_tokens == batch: the fused decode kernel
    out = rope_paged_attention_triton(*args, decode_config=cfg)
    check(args, original, out, f"{case} {cfg} {qkv_layout} {cos_layout} no_write={no_write}")


@pytest.mark.gpu
@settings(max_examples=25)
@given(step=decode_step(max_batch=8, head_dims=(64, 80, 128, 256), block_sizes=GPU_BLOCK_SIZES, max_blocks=40),
       sms=st.sampled_from([1, 132]))
def test_decode_default_tiles_cuda(step, sms):
    """The op's default decode tiling natively; on one "SM", more (token, kv head) pairs than bn128 keeps resident
    take the wave tiling (bn32 with 1 warp at head_dim 128, bn64 with 2 at head_dim 64, in 16 bits)."""
    case, no_write = step
    args, original = make_inputs(case, "cuda", no_write=no_write, seed=case.seed)
    with unittest.mock.patch.object(paged_attention_module, "_num_sms", lambda device: sms):
        check(args, original, OP(*args), f"{case} sms={sms} no_write={no_write}")


@pytest.mark.parametrize("merge", ["head", "group", "fused"])
@pytest.mark.parametrize("ctx", [1, 15, 16, 17, 47, 48, 64])
def test_new_key_in_each_tile_position(ctx, merge):
    """The new key at the start, inside and at the end of a tile and of a split, with full and ragged last tiles
    (block_n 16, partitions of 16 and 48 keys), at several splits and at one."""
    for partition in (16, 48, None):
        case = Case([1, 1], [ctx, max(1, ctx - 5)], 2, 2, 32, 8, torch.float32, seed=ctx)
        cfg = DecodeConfig(16, 4, 1, partition_size=partition, merge=merge, short_partition=16, min_partition=16)
        args, original = make_inputs(case, TRITON_DEVICE, seed=ctx)
        check(args, original, rope_paged_attention_triton(*args, decode_config=cfg), f"ctx {ctx} {cfg}")


@settings(max_examples=max(30, settings().max_examples))
@given(data=st.data(), cfg=st.sampled_from(SMALL_PREFILL))
def test_other_steps_match_float64(data, cfg):
    """Prefill, chunked prefill and mixed steps (num_tokens != batch): RoPE and cache write, then the flash kernel."""
    bs = data.draw(st.sampled_from([8, 16]))
    kv_heads, group = data.draw(st.sampled_from(HEADS))
    seq_lens = data.draw(st.lists(context_length(bs, 3), min_size=1, max_size=3))
    q_lens = [data.draw(st.integers(1, ctx)) for ctx in seq_lens]
    if sum(q_lens) == len(q_lens):
        q_lens[0], seq_lens[0] = 2, max(2, seq_lens[0])
    case = Case(q_lens, seq_lens, kv_heads, group, data.draw(st.sampled_from([16, 64])), bs,
                data.draw(st.sampled_from(DTYPES)), seed=data.draw(st.integers(0, 2**16)))
    args, original = make_inputs(case, TRITON_DEVICE, seed=case.seed)
    check(args, original, rope_paged_attention_triton(*args, prefill_config=cfg), f"{case} {cfg}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1, 1], [9, 17, 3]), ([3, 1], [5, 17])])  # no padding rows (unspecified)
def test_opcheck(device, q_lens, seq_lens):
    case = Case(q_lens, seq_lens, 2, 2, 16, 8, torch.bfloat16)
    args, _ = make_inputs(case, device)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("device", ["cpu", TRITON_DEVICE])
def test_op_matches_the_two_ops(device):
    """The registered op (CPU reference, or the Triton kernel on a GPU) equals rope_kv_cache_write then
    paged_attention, caches included."""
    case = Case([1, 1, 1], [7, 16, 33], 2, 3, 32, 8, torch.float32)
    args, original = make_inputs(case, device)
    out = OP(*args)
    q, k, v, cos, sin, _, _, slots, tables, lens, starts, scale = args
    k2, v2 = (c.clone().to(device) for c in original)
    q_rot = torch.ops.cinfer.rope_kv_cache_write(q, k, v, cos, sin, k2, v2, slots)
    out2 = torch.ops.cinfer.paged_attention(q_rot, k2, v2, tables, lens, starts, scale)
    assert_close(out, out2.double(), ATTENTION, torch.float32)
    for a, b in ((args[5], k2), (args[6], v2)):  # the two kernels may round the rotation's products differently
        assert torch.equal(a.isnan(), b.isnan())
        assert_close(a[~a.isnan()], b[~b.isnan()].double(), ELEMENTWISE, torch.float32)


def test_rejects_bad_arguments():
    case = Case([1, 1], [9, 17], 2, 2, 16, 8, torch.float32)
    args, _ = make_inputs(case, "cpu")

    def call(**changes):
        names = ["query", "key", "value", "cos", "sin", "k_cache", "v_cache", "slot_mapping", "block_tables",
                 "seq_lens", "query_start_loc", "scale"]
        kwargs = dict(zip(names, args))
        kwargs.update(changes)
        return OP(*kwargs.values())

    with pytest.raises(ValueError, match="block_tables must be int32"):
        call(block_tables=args[8].long())
    with pytest.raises(ValueError, match=r"seq_lens must be int32 \[2\]"):
        call(seq_lens=args[9][:1])
    with pytest.raises(ValueError, match=r"query_start_loc must be int32 \[3\]"):
        call(query_start_loc=args[10].long())
    with pytest.raises(ValueError, match="cos must be"):
        call(cos=args[3][:, :8])
    with pytest.raises(ValueError, match="slot_mapping"):
        call(slot_mapping=args[7].int())
    assert math.isfinite(float(call().float().sum()))  # the engine state is intact: a good call still works
