"""``cinfer::paged_attention`` against an independent float64 reference.

The Triton kernels run natively on a GPU and through Triton's interpreter on CPU (tests/conftest.py), with small
tile sizes there so that short contexts still span several tiles and splits. Every case poisons what must never
be read: cache slots outside each sequence's context hold NaN, block-table entries past a sequence's last block
hold garbage (indices of poisoned blocks, -1, huge values), and physical blocks are a random permutation.
"""
import dataclasses
import importlib
import math
import unittest.mock
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cinfer_ops  # noqa: F401  (registers torch.ops.cinfer.*)
from cinfer_ops.paged_attention import DecodeConfig, PrefillConfig, paged_attention_triton
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import ATTENTION, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The module, not the op of the same name that cinfer_ops re-exports.
paged_attention_module = importlib.import_module("cinfer_ops.paged_attention")
OP_DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# Interpreter-sized tiles: ragged last tiles, several key tiles per query tile, several splits per sequence.
SMALL_PREFILL = [PrefillConfig(16, 16, 4, 1), PrefillConfig(32, 16, 4, 1), PrefillConfig(64, 32, 4, 1)]
SMALL_DECODE_PARTITIONS = [16, 32, 48]
# One entry per structural variant of the split-KV kernel (DecodeConfig fields), the original kernel first.
DECODE_VARIANTS = [
    {},
    dict(kv_gather="page"),
    dict(grid_order="head"),
    dict(grid_order="split"),
    dict(merge="group"),
    dict(merge="fused"),
    dict(merge="fused", grid_order="split", kv_gather="page"),
    dict(direct_single_split=True),
    dict(merge="group", direct_single_split=True, grid_order="head"),
]
VARIANT_IDS = ["-".join(f"{k}={v}" for k, v in d.items()) or "original" for d in DECODE_VARIANTS]


def reference_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """float64, one query token at a time: gather each visible position's K/V by slot, softmax, weighted sum."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    q = query.double().cpu()
    k_slots = k_cache.double().cpu().reshape(-1, kv_heads, head_dim)
    v_slots = v_cache.double().cpu().reshape(-1, kv_heads, head_dim)
    tables, lens, starts = block_tables.cpu().long(), seq_lens.cpu().tolist(), query_start_loc.cpu().tolist()
    kv_head_of = torch.arange(num_heads) // group
    out = torch.full((num_tokens, num_heads, head_dim), float("nan"), dtype=torch.float64)
    for b, ctx in enumerate(lens):
        q_len = starts[b + 1] - starts[b]
        for i in range(q_len):
            visible = torch.arange(ctx - q_len + i + 1)
            slots = tables[b, visible // block_size] * block_size + visible % block_size
            k = k_slots[slots][:, kv_head_of]  # [visible, num_heads, head_dim]
            v = v_slots[slots][:, kv_head_of]
            scores = torch.einsum("hd,nhd->hn", q[starts[b] + i], k) * scale
            out[starts[b] + i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


@dataclass
class Case:
    q_lens: list[int]
    seq_lens: list[int]
    num_kv_heads: int
    group: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    padding_rows: int = 0  # query rows past query_start_loc[-1] (CUDA-graph padding)
    scale_factor: float = 1.0
    seed: int = 0


def build(case: Case, device: str):
    """Tensors for one case: (query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)."""
    gen = torch.Generator().manual_seed(case.seed)
    bs, kv_heads, head_dim = case.block_size, case.num_kv_heads, case.head_dim
    batch = len(case.q_lens)
    blocks_needed = [math.ceil(n / bs) for n in case.seq_lens]
    max_blocks = max(blocks_needed, default=0) + 2  # room for garbage past every sequence's last block
    num_blocks = sum(blocks_needed) + 3  # spare blocks stay fully poisoned
    physical = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.full((num_blocks, bs, kv_heads, head_dim), float("nan"), dtype=case.dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    garbage = [-1, 2**31 - 1, -(2**31), num_blocks, 10**6] + physical.tolist()
    block_tables = torch.tensor(garbage, dtype=torch.int32)[torch.randint(len(garbage), (batch, max_blocks), generator=gen)]
    used = 0
    for b, (ctx, n_blocks) in enumerate(zip(case.seq_lens, blocks_needed)):
        for j in range(n_blocks):
            block = physical[used]
            used += 1
            block_tables[b, j] = block
            rows = min(bs, ctx - j * bs)
            k_cache[block, :rows] = torch.randn(rows, kv_heads, head_dim, generator=gen).to(case.dtype)
            v_cache[block, :rows] = torch.randn(rows, kv_heads, head_dim, generator=gen).to(case.dtype)
    query_start_loc = torch.tensor([0] + torch.tensor(case.q_lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    num_tokens = int(query_start_loc[-1]) + case.padding_rows
    query = torch.randn(num_tokens, kv_heads * case.group, head_dim, generator=gen).to(case.dtype)
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32)
    scale = case.scale_factor / math.sqrt(head_dim)
    tensors = [t.to(device) for t in (query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)]
    return (*tensors, scale)


def check(case: Case, out, args, msg=""):
    expected = reference_attention(*args)
    real = int(args[5][-1])
    assert out.shape == args[0].shape and out.dtype == case.dtype
    assert_close(out[:real], expected[:real], ATTENTION, case.dtype, msg=f"{case} {msg}")


# ---- strategies ---------------------------------------------------------------------------------------------------

HEADS = [(1, 1), (2, 1), (1, 4), (2, 2), (1, 3), (2, 4)]  # (num_kv_heads, group): MHA, MQA and GQA, one odd group


@st.composite
def context_length(draw, block_size, max_blocks):
    """At and around block boundaries most of the time, anywhere otherwise."""
    if draw(st.booleans()):
        return max(1, draw(st.integers(0, max_blocks)) * block_size + draw(st.sampled_from([-1, 0, 1])))
    return draw(st.integers(1, max_blocks * block_size))


@st.composite
def mixed_case(draw, max_batch=4, head_dims=(16, 64, 80, 128), block_sizes=(8, 16, 32), max_blocks=3):
    """Prefill, chunked/prefix-cached prefill and decode sequences in one batch; never num_tokens == batch."""
    bs = draw(st.sampled_from(block_sizes))
    kv_heads, group = draw(st.sampled_from(HEADS))
    q_lens, seq_lens = [], []
    for _ in range(draw(st.integers(1, max_batch))):
        ctx = draw(context_length(bs, max_blocks))
        kind = draw(st.sampled_from(["prefill", "chunk", "decode"]))
        q_len = ctx if kind == "prefill" else 1 if kind == "decode" else draw(st.integers(1, ctx))
        q_lens.append(q_len)
        seq_lens.append(ctx)
    padding = draw(st.integers(0, 2))
    if sum(q_lens) + padding == len(q_lens):
        padding += 1  # keep this the flash kernel's test; the decode kernel has its own
    return Case(q_lens, seq_lens, kv_heads, group, draw(st.sampled_from(head_dims)), bs, draw(st.sampled_from(DTYPES)),
                padding_rows=padding, scale_factor=draw(st.sampled_from([0.5, 1.0, 2.0])), seed=draw(st.integers(0, 2**16)))


@st.composite
def decode_case(draw, max_batch=5, head_dims=(16, 64, 80, 128), block_sizes=(8, 16, 32), max_blocks=8):
    """num_tokens == batch (the split-KV kernel). Usually one query per sequence; sometimes q_len 0, 2 or 3 and
    padding rows, which that kernel must get right too."""
    bs = draw(st.sampled_from(block_sizes))
    kv_heads, group = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, max_batch))
    if draw(st.integers(0, 3)) == 0:
        q_lens = draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch))
        while sum(q_lens) > len(q_lens):
            q_lens.append(0)
    else:
        q_lens = [1] * batch
    seq_lens = [max(q, draw(context_length(bs, max_blocks))) for q in q_lens]
    padding = len(q_lens) - sum(q_lens)
    return Case(q_lens, seq_lens, kv_heads, group, draw(st.sampled_from(head_dims)), bs, draw(st.sampled_from(DTYPES)),
                padding_rows=padding, scale_factor=draw(st.sampled_from([0.5, 1.0, 2.0])), seed=draw(st.integers(0, 2**16)))


@st.composite
def decode_config(draw):
    """Interpreter-sized split-KV tiles with every variant flag: block_n below, at and above the block sizes,
    fixed partitions or ones sized from the grid (small min_partition so that short contexts split too)."""
    return DecodeConfig(
        block_n=draw(st.sampled_from([16, 32])), num_warps=4, num_stages=1,
        partition_size=draw(st.sampled_from(SMALL_DECODE_PARTITIONS + [None])),
        programs_per_sm=draw(st.sampled_from([1, 16, 64])), min_partition=draw(st.sampled_from([16, 32, 512])),
        short_partition=draw(st.sampled_from([16, 32, 512])),
        max_splits=draw(st.sampled_from([2, 128])),
        kv_gather=draw(st.sampled_from(paged_attention_module.KV_GATHERS)),
        grid_order=draw(st.sampled_from(paged_attention_module.GRID_ORDERS)),
        merge=draw(st.sampled_from(paged_attention_module.MERGES)),
        direct_single_split=draw(st.booleans()), fit_splits=draw(st.booleans()),
        # the wave tiling: on the interpreter's 8 "SMs" a band of (8, 40] or (24, 40] pairs, or unbounded above
        wave_block_n=draw(st.sampled_from([0, 16, 32])), resident=draw(st.sampled_from([1, 3])),
        wave_resident=draw(st.sampled_from([0, 5])), wave_num_warps=draw(st.sampled_from([0, 2])),
    )


# ---- the Triton kernels (interpreter on CPU, native on GPU) -------------------------------------------------------

@settings(max_examples=max(100, settings().max_examples))
@given(case=mixed_case(), cfg=st.sampled_from(SMALL_PREFILL))
def test_flash_kernel_matches_reference(case, cfg):
    args = build(case, TRITON_DEVICE)
    assert args[0].shape[0] != args[3].shape[0]
    check(case, paged_attention_triton(*args, prefill_config=cfg), args, f"{cfg}")


@settings(max_examples=max(100, settings().max_examples))
@given(case=decode_case(), cfg=decode_config())
def test_split_kv_kernel_matches_reference(case, cfg):
    args = build(case, TRITON_DEVICE)
    assert args[0].shape[0] == args[3].shape[0]
    check(case, paged_attention_triton(*args, decode_config=cfg), args, f"{cfg}")


# 64-bit offsets change only the address arithmetic: run them with the variants that address K/V differently.
VARIANTS_INT64 = [(v, False) for v in DECODE_VARIANTS] + [(v, True) for v in DECODE_VARIANTS if not v or "kv_gather" in v]


@pytest.mark.parametrize("variant,int64_offsets", VARIANTS_INT64,
                         ids=[f"{'int64-' if i else ''}{VARIANT_IDS[DECODE_VARIANTS.index(v)]}" for v, i in VARIANTS_INT64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_kv_kernel_many_splits(dtype, int64_offsets, variant, monkeypatch):
    # Contexts across 1 to 7 splits of 16 keys, some ending one key into a split, with GQA: the log-sum-exp merge.
    # Caches of 2**31 elements and more take 64-bit offsets; lowering the threshold runs that path on a small one.
    # Tiles of 16 keys span 2 pages of 8 (the page-granular variants broadcast page entries).
    if int64_offsets:
        monkeypatch.setattr(paged_attention_module, "_INT32_OFFSET_LIMIT", 0)
    case = Case(q_lens=[1] * 5, seq_lens=[1, 17, 48, 97, 112], num_kv_heads=2, group=4, head_dim=64, block_size=8,
                dtype=dtype, seed=7)
    args = build(case, TRITON_DEVICE)
    cfg = DecodeConfig(16, 4, 1, partition_size=16, **variant)
    check(case, paged_attention_triton(*args, decode_config=cfg), args, f"{cfg}")


@pytest.mark.parametrize("merge", ["group", "fused"])
def test_split_kv_group_merge_in_several_steps(merge, monkeypatch):
    # The group merges read [heads, splits, head_dim] tiles; a small tile budget makes them take 2 splits per
    # step over 9 splits, with an odd group (3 query heads padded to 4) and head_dim 80 (padded to 128).
    monkeypatch.setattr(paged_attention_module, "_MERGE_TILE_ELEMENTS", 64)
    assert paged_attention_module._merge_chunk(4, 128) == 2
    case = Case(q_lens=[1] * 4, seq_lens=[144, 5, 130, 64], num_kv_heads=2, group=3, head_dim=80, block_size=16,
                dtype=torch.float32, seed=13)
    args = build(case, TRITON_DEVICE)
    for direct in (False, True):
        cfg = DecodeConfig(16, 4, 1, partition_size=16, merge=merge, direct_single_split=direct)
        check(case, paged_attention_triton(*args, decode_config=cfg), args, f"{cfg}")


@pytest.mark.parametrize("variant", DECODE_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("q_lens", [[2, 0, 1], [0, 3, 0], [0, 0, 0], [1, 1, 0]])
def test_split_kv_kernel_with_uneven_queries(q_lens, variant):
    # num_tokens == batch picks the split-KV kernel from shapes alone; it must not assume one query per sequence.
    case = Case(q_lens=q_lens, seq_lens=[max(q, 1) + 20 for q in q_lens], num_kv_heads=1, group=2, head_dim=32,
                block_size=8, dtype=torch.float32, padding_rows=len(q_lens) - sum(q_lens), seed=3)
    args = build(case, TRITON_DEVICE)
    for partition in (16, None):
        check(case, paged_attention_triton(*args, decode_config=DecodeConfig(16, 4, 1, partition, **variant)), args)


@pytest.mark.parametrize("variant", [dict(merge="fused"), dict(merge="head"), dict(merge="group", direct_single_split=True)],
                         ids=["fused", "head", "group-direct"])
def test_split_kv_fits_partitions_to_each_context(variant, monkeypatch):
    # A table far wider than the contexts, as the runtime's (max_model_len wide): 8 splits of 128 keys are sized
    # from the width; each token spreads its own context over them, in partitions of 16 keys at least. Contexts
    # below, at and above those steps; the table's unused columns hold garbage that must never be read.
    monkeypatch.setattr(paged_attention_module, "_num_sms", lambda device: 8)
    case = Case(q_lens=[1] * 7, seq_lens=[1, 15, 16, 17, 100, 129, 160], num_kv_heads=2, group=2, head_dim=32,
                block_size=8, dtype=torch.float32, seed=21)
    query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale = build(case, TRITON_DEVICE)
    width = 128  # pages of 8: 1024 keys
    garbage = torch.tensor([-1, 2**31 - 1, 10**6], dtype=torch.int32, device=block_tables.device)
    wide = garbage[torch.randint(3, (block_tables.shape[0], width), generator=torch.Generator().manual_seed(0))
                   .to(block_tables.device)]
    wide[:, :block_tables.shape[1]] = block_tables
    args = (query, k_cache, v_cache, wide, seq_lens, query_start_loc, scale)
    cfg = DecodeConfig(16, 4, 1, programs_per_sm=16, min_partition=16, short_partition=16, **variant)
    assert paged_attention_module._decode_partition(7 * 2, 1024, cfg, 8) == (1024 // 8, 16)
    for fit in (True, False):
        check(case, paged_attention_triton(*args, decode_config=dataclasses.replace(cfg, fit_splits=fit)), args,
              f"fit_splits={fit}")


def test_decode_partition_sizing():
    # Split sizing from shapes alone, on a 132-SM card with 8 kv heads and block_n 128 (the shapes and the
    # sweep's others): (token, kv_head) pairs up to 2 per SM split into as many as keep the programs within that,
    # up to twice that take 2 splits, more take 1; no split shorter than short_partition / min_partition, at most
    # max_splits.
    default = DecodeConfig(128, 4, 2)

    def partition(*args):
        return paged_attention_module._decode_partition(*args)[0]

    for batch, context, splits in [(4, 32768, 8), (8, 32768, 4), (16, 16384, 2), (33, 8192, 1), (34, 8192, 2),
                                   (64, 4096, 2), (66, 4096, 2), (67, 4096, 1), (128, 2048, 1), (256, 512, 1)]:
        assert partition(batch * 8, context, default, 132) == context // splits, (batch, context)
    assert partition(8, 8192, default, 132) == 256  # batch 1: 33 splits wanted, 32 of 256 keys
    # Splits as short as short_partition while the pairs are at most a quarter of the target, min_partition after.
    least = paged_attention_module._least_partition
    assert [least(pairs, default, 132) for pairs in (8, 66, 67, 512)] == [128, 128, 512, 512]
    assert partition(8 * 8, 1024, default, 132) == 256 and partition(16 * 8, 1024, default, 132) == 512
    assert least(8, DecodeConfig(128, 4, 2, short_partition=100), 132) == 128  # a whole number of tiles
    assert partition(8 * 8, 32768, DecodeConfig(128, 4, 2, programs_per_sm=8), 132) == 2048  # 16 splits
    assert partition(8 * 8, 32768, DecodeConfig(128, 4, 2, max_splits=2), 132) == 16384
    assert partition(8 * 8, 100_000, default, 132) == 25088  # 4 splits of 196 tiles, the last one shorter
    assert partition(256 * 8, 512, DecodeConfig(128, 4, 2, min_partition=128, programs_per_sm=64), 132) == 128
    assert partition(1, 100, DecodeConfig(32, 4, 2, partition_size=40), 132) == 64  # rounded up to block_n


def test_wave_tiling_band(monkeypatch):
    # The default head_dim-128 config on 132 SMs with 8 kv heads: a step of more pairs than bn128 keeps resident (3
    # per SM, 396) runs bn32 with 1 warp at one split the table wide; smaller steps keep cfg. A bounded band
    # (wave_resident) hands larger steps back to cfg.
    monkeypatch.setattr(paged_attention_module, "_num_sms", lambda device: 132)
    cfg = paged_attention_module.DECODE_CONFIGS[128]
    step = paged_attention_module._step_config
    for batch, wave in [(1, False), (49, False), (50, True), (64, True), (83, True), (256, True), (4096, True)]:
        got = step(batch * 8, 4096, cfg, 132)
        assert (got.block_n, got.num_warps, got.partition_size) == ((32, 1, 4096) if wave else (128, 4, None)), batch
        assert (got.num_stages, got.grid_order, got.merge) == (cfg.num_stages, cfg.grid_order, cfg.merge)
    assert step(64 * 8, 1000, cfg, 132).partition_size == 1024  # whole tiles
    assert step(64 * 8, 4096, dataclasses.replace(cfg, wave_block_n=0), 132).block_n == 128
    assert step(64 * 8, 4096, dataclasses.replace(cfg, partition_size=512), 132).block_n == 128  # fixed splits
    bounded = dataclasses.replace(cfg, wave_resident=5)  # a band of (396, 660] pairs: batch 50-82
    assert [step(b * 8, 4096, bounded, 132).block_n for b in (49, 50, 82, 83)] == [128, 32, 32, 128]
    same_warps = dataclasses.replace(cfg, wave_num_warps=0)
    assert step(64 * 8, 4096, same_warps, 132).num_warps == cfg.num_warps
    variant_batches = paged_attention_module.decode_variant_batches
    assert variant_batches(256, 8, 128, torch.device("cpu")) == [1, 50]
    assert variant_batches(64, 8, 128, torch.device("cpu")) == [1, 50]
    assert variant_batches(40, 8, 128, torch.device("cpu")) == [1]
    assert variant_batches(256, 8, 128, torch.device("cpu"), decode_config=bounded) == [1, 50]  # 83 on: batch 1's
    # a band whose tiling differs from cfg's in its warps only is a variant of its own too
    warps_only = dataclasses.replace(cfg, wave_block_n=cfg.block_n)
    assert variant_batches(256, 8, 128, torch.device("cpu"), decode_config=warps_only) == [1, 50]
    assert variant_batches(256, 8, 256, torch.device("cpu")) == [1]  # the head_dim-256 row has no wave tiling
    # the head_dim-64 row (Llama-3.2-1B) has its own: bn64 with 2 warps, from the same band start
    row64 = paged_attention_module.DECODE_CONFIGS[64]
    for batch, wave in [(49, False), (50, True), (256, True)]:
        got = step(batch * 8, 2048, row64, 132)
        assert (got.block_n, got.num_warps, got.partition_size) == ((64, 2, 2048) if wave else (128, 4, None)), batch
    assert variant_batches(256, 8, 64, torch.device("cpu")) == [1, 50]
    assert variant_batches(256, 8, 128, torch.device("cpu"), dtype=torch.float32) == [1]  # nor has fp32


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fp32_decode_tiles_are_smaller(head_dim):
    # 16-bit K/V take DECODE_CONFIGS' row; fp32 (exact FMA dots, which spill at those tiles on sm_90) takes tiles of
    # at most _FP32_DECODE_TILE elements, whole keys of 16 at least, without the wave tiling.
    row = paged_attention_module._pick(paged_attention_module.DECODE_CONFIGS, head_dim)
    default = paged_attention_module.default_decode_config
    assert default(head_dim, torch.bfloat16) is row and default(head_dim, torch.float16) is row
    fp32 = default(head_dim, torch.float32)
    assert fp32.block_n == max(16, min(row.block_n, paged_attention_module._FP32_DECODE_TILE // head_dim))
    assert fp32.block_n < row.block_n and fp32.wave_block_n == 0
    assert dataclasses.replace(fp32, block_n=row.block_n, wave_block_n=row.wave_block_n) == row  # nothing else


@settings(max_examples=200, deadline=None)
@given(max_batch=st.integers(1, 400), kv_heads=st.integers(1, 16), head_dim=st.sampled_from([64, 128, 256]),
       num_sms=st.sampled_from([8, 78, 132, 144]), width=st.sampled_from([128, 1000, 8192]))
def test_decode_variant_batches_name_every_tiling(max_batch, kv_heads, head_dim, num_sms, width):
    # What the warm-up relies on: every decode batch up to max_batch takes the tiling of one of the named batches,
    # the first named batch is 1, and the named batches take different tilings.
    with unittest.mock.patch.object(paged_attention_module, "_num_sms", lambda device: num_sms):
        named = paged_attention_module.decode_variant_batches(max_batch, kv_heads, head_dim, torch.device("cpu"))
        cfg = paged_attention_module._pick(paged_attention_module.DECODE_CONFIGS, head_dim)

        def tiling(batch):
            step = paged_attention_module._step_config(batch * kv_heads, width, cfg, num_sms)
            return step.block_n, step.num_warps

        assert named[0] == 1 and named == sorted(named) and named[-1] <= max_batch
        assert len({tiling(b) for b in named}) == len(named)
        assert {tiling(b) for b in range(1, max_batch + 1)} == {tiling(b) for b in named}


@settings(max_examples=300, deadline=None)
@given(pairs=st.integers(1, 70_000), width=st.integers(1, 300_000), block_n=st.sampled_from([16, 32, 64, 128]),
       programs_per_sm=st.integers(1, 32), min_partition=st.integers(1, 4096), short_partition=st.integers(1, 4096),
       max_splits=st.integers(1, 256), num_sms=st.sampled_from([8, 78, 132, 144]))
def test_decode_partition_sizing_invariants(pairs, width, block_n, programs_per_sm, min_partition, short_partition,
                                            max_splits, num_sms):
    # Whatever the shapes: whole tiles, at most max_splits splits, no more programs than the target (or 2 splits
    # a pair, the middle band), and no split shorter than the least partition unless the table itself is.
    cfg = DecodeConfig(block_n, 4, 2, programs_per_sm=programs_per_sm, min_partition=min_partition,
                       short_partition=short_partition, max_splits=max_splits)
    partition, least = paged_attention_module._decode_partition(pairs, width, cfg, num_sms)
    assert least == paged_attention_module._least_partition(pairs, cfg, num_sms)
    splits = -(-width // partition)
    assert partition % block_n == 0 and least % block_n == 0 and least >= min(short_partition, min_partition)
    assert 1 <= splits <= max_splits
    assert pairs * splits <= max(programs_per_sm * num_sms, 2 * pairs)
    assert splits == 1 or partition >= least


@pytest.mark.parametrize("field,value", [("block_n", 24), ("block_n", 8), ("partition_size", 0), ("programs_per_sm", 0),
                                         ("min_partition", 0), ("max_splits", 0), ("kv_gather", "row"),
                                         ("grid_order", "batch"), ("merge", "tree"), ("wave_block_n", 24),
                                         ("resident", 0), ("wave_resident", -1), ("wave_num_warps", 3)])
def test_decode_config_rejects_bad_values(field, value):
    kwargs = dict(block_n=32, num_warps=4, num_stages=2) | {field: value}
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**kwargs)


@pytest.mark.parametrize("int64_offsets", [False, True])
def test_flash_kernel_long_prefill_with_prefix(int64_offsets, monkeypatch):
    # Prefix-cached prefill: 40 new tokens after 60 cached ones, next to a full prefill and a decode, tiles of
    # 16 tokens x 2 heads: query tiles cross key blocks and the unmasked/diagonal split lands mid-tile.
    if int64_offsets:
        monkeypatch.setattr(paged_attention_module, "_INT32_OFFSET_LIMIT", 0)
    case = Case(q_lens=[40, 33, 1], seq_lens=[100, 33, 70], num_kv_heads=2, group=2, head_dim=32, block_size=16,
                dtype=torch.float32, seed=11)
    args = build(case, TRITON_DEVICE)
    check(case, paged_attention_triton(*args, prefill_config=PrefillConfig(32, 16, 4, 1)), args)


@pytest.mark.parametrize("variant", DECODE_VARIANTS, ids=VARIANT_IDS)
def test_decode_padding_sequences(variant):
    # A CUDA-graph batch bucket: two real sequences, two padding ones with an empty context and garbage tables.
    case = Case(q_lens=[1, 1, 1, 1], seq_lens=[30, 9, 0, 0], num_kv_heads=1, group=4, head_dim=16, block_size=8,
                dtype=torch.float16, seed=5)
    args = build(case, TRITON_DEVICE)
    expected = reference_attention(*args)
    for partition in (16, None):
        out = paged_attention_triton(*args, decode_config=DecodeConfig(16, 4, 1, partition, **variant))
        assert_close(out[:2], expected[:2], ATTENTION, case.dtype)
        assert torch.isfinite(out[2:]).all()  # unspecified, but a padding row must not turn into NaN


FUSED_VARIANTS = [v for v in DECODE_VARIANTS if v.get("merge") == "fused"]


@pytest.mark.parametrize("variant", FUSED_VARIANTS, ids=[VARIANT_IDS[DECODE_VARIANTS.index(v)] for v in FUSED_VARIANTS])
def test_fused_merge_leaves_its_counters_zero(variant):
    # The fused merge's arrival counters persist across launches (no fill kernel per call): each launch must leave
    # them all zero, or the next would merge a group early (reading splits not yet written) or never. Calls in a
    # row on one buffer, over NaN-poisoned caches: contexts of 1 to 7 splits, uneven queries with padding rows,
    # padding sequences with empty contexts; each result checked, and the buffer after each call.
    cases = [
        Case(q_lens=[1] * 5, seq_lens=[1, 17, 48, 97, 112], num_kv_heads=2, group=4, head_dim=64, block_size=8,
             dtype=torch.float32, seed=7),
        Case(q_lens=[2, 0, 1], seq_lens=[22, 21, 64], num_kv_heads=1, group=2, head_dim=32, block_size=8,
             dtype=torch.float16, seed=3),
        Case(q_lens=[1, 1, 1, 1], seq_lens=[30, 9, 0, 0], num_kv_heads=1, group=4, head_dim=16, block_size=8,
             dtype=torch.bfloat16, seed=5),
    ]
    cfg = DecodeConfig(16, 4, 1, partition_size=16, **variant)
    counters = None
    for case in cases * 2:
        args = build(case, TRITON_DEVICE)
        check(case, paged_attention_triton(*args, decode_config=cfg), args, f"{cfg}")
        buffers = paged_attention_module._merge_counters[args[0].device]
        counters = counters if counters is not None else buffers[-1]
        assert buffers[-1] is counters, "the counters must be reused, not reallocated"
        assert all(int(b.count_nonzero()) == 0 for b in buffers), f"counters left non-zero after {case}"


def test_merge_counters_grow_and_keep_old_buffers(monkeypatch):
    # Grown on demand (outside CUDA-graph capture), doubling; a superseded buffer stays referenced because graphs
    # captured over it still use it. A larger step after a smaller one must merge correctly on the grown buffer.
    monkeypatch.setattr(paged_attention_module, "_merge_counters", {})
    monkeypatch.setattr(paged_attention_module, "_MIN_MERGE_COUNTERS", 4)
    device = torch.device(TRITON_DEVICE, 0) if TRITON_DEVICE == "cuda" else torch.device("cpu")
    counter = paged_attention_module._merge_counter
    first = counter(3, device)
    assert first.numel() == 4 and first.dtype == torch.int32 and counter(4, device) is first
    second = counter(5, device)
    assert second.numel() == 8 and paged_attention_module._merge_counters[device] == [first, second]
    assert counter(20, device).numel() == 20 and len(paged_attention_module._merge_counters[device]) == 3
    cfg = DecodeConfig(16, 4, 1, partition_size=16, merge="fused")
    for batch in (2, 12):  # 4 then 24 counters
        case = Case(q_lens=[1] * batch, seq_lens=[17 + 5 * i for i in range(batch)], num_kv_heads=2, group=2,
                    head_dim=16, block_size=8, dtype=torch.float32, seed=batch)
        args = build(case, TRITON_DEVICE)
        check(case, paged_attention_triton(*args, decode_config=cfg), args)
    buffers = paged_attention_module._merge_counters[device]
    assert len(buffers) == 4 and buffers[-1].numel() == 40 and all(int(b.count_nonzero()) == 0 for b in buffers)


# ---- the registered op -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", OP_DEVICES)
@settings(max_examples=15)
@given(case=st.one_of(mixed_case(), decode_case()))
def test_op_matches_reference(device, case):
    args = build(case, device)
    out = torch.ops.cinfer.paged_attention(*args)
    assert out.device.type == device
    check(case, out, args)


GPU_BLOCK_SIZES = (16, 32, 128)


@pytest.mark.gpu
@settings(max_examples=25)
@given(case=st.one_of(mixed_case(max_batch=6, head_dims=(64, 80, 128, 256), block_sizes=GPU_BLOCK_SIZES, max_blocks=12),
                      decode_case(max_batch=8, head_dims=(64, 80, 128, 256), block_sizes=GPU_BLOCK_SIZES, max_blocks=40)))
def test_op_cuda_default_tiles(case):
    # The tuned default tile sizes, at sizes the interpreter would be too slow for.
    args = build(case, "cuda")
    check(case, torch.ops.cinfer.paged_attention(*args), args)


@pytest.mark.gpu
@settings(max_examples=25)
@given(case=decode_case(max_batch=8, head_dims=(64, 80, 128, 256), block_sizes=GPU_BLOCK_SIZES, max_blocks=40))
def test_op_cuda_wave_tiling(case):
    # The default config's wave tiling (16 bits: bn32 with 1 warp at head_dim 128, bn64 with 2 at head_dim 64)
    # natively, at small sizes: on one "SM" every step of more (token, kv head) pairs than bn128 keeps resident (3)
    # takes it.
    args = build(case, "cuda")
    d_pad = max(1 << (case.head_dim - 1).bit_length(), 16)
    cfg = paged_attention_module.default_decode_config(d_pad, case.dtype)
    pairs = args[3].shape[0] * case.num_kv_heads  # sequences (block-table rows) x kv heads
    wave = paged_attention_module._step_config(pairs, args[3].shape[1] * case.block_size, cfg, 1)
    with unittest.mock.patch.object(paged_attention_module, "_num_sms", lambda device: 1):
        check(case, torch.ops.cinfer.paged_attention(*args), args, f"{wave}")
    if d_pad in (64, 128) and case.dtype != torch.float32 and pairs > cfg.resident:
        assert (wave.block_n, wave.num_warps) == {64: (64, 2), 128: (32, 1)}[d_pad]


@pytest.mark.gpu
@settings(max_examples=25)
@given(case=decode_case(max_batch=8, head_dims=(64, 80, 128, 256), block_sizes=GPU_BLOCK_SIZES, max_blocks=40),
       block_n=st.sampled_from([32, 64, 128]), num_stages=st.sampled_from([2, 5]),
       variant=st.sampled_from(DECODE_VARIANTS), partition=st.sampled_from([None, 64, 256]))
def test_split_kv_variants_cuda(case, block_n, num_stages, variant, partition):
    # Each variant natively, at GPU tile sizes and pipeline depths (5 stages double-buffer the K/V loads).
    elem = torch.finfo(case.dtype).bits // 8
    d_pad = 1 << (case.head_dim - 1).bit_length()
    while block_n > 16 and 2 * block_n * d_pad * elem * max(1, (num_stages - 1) // 2) > 96 * 1024:
        block_n //= 2  # K and V buffers within shared memory
    args = build(case, "cuda")
    cfg = DecodeConfig(block_n, 4, num_stages, partition, min_partition=64, **variant)
    check(case, paged_attention_triton(*args, decode_config=cfg), args, f"{cfg}")


GRAPH_DECODE_CONFIGS = [
    None,
    DecodeConfig(64, 4, 5, kv_gather="page", merge="fused", grid_order="split", programs_per_sm=8),
    DecodeConfig(128, 4, 2, merge="group", direct_single_split=True, grid_order="head"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("decode_config", GRAPH_DECODE_CONFIGS, ids=["default", "fused", "group-direct"])
@pytest.mark.parametrize("first,second", [
    (([1] * 6, [500, 31, 1200, 16, 7, 64]), ([1] * 6, [33, 900, 2, 1100, 640, 129])),  # decode, split-KV
    (([50, 1, 20], [300, 17, 20]), ([10, 10, 51], [10, 100, 61])),  # mixed prefill, same token count
])
def test_cuda_graph_replay(first, second, decode_config):
    # Capture one call, then refill the static inputs with other sequences and replay: a host sync would fail the
    # capture, a value baked in at capture time would fail the comparison.
    cases = [Case(q, s, num_kv_heads=2, group=4, head_dim=128, block_size=16, dtype=torch.bfloat16, seed=i)
             for i, (q, s) in enumerate((first, second))]
    inputs = [build(case, "cuda") for case in cases]
    static = []
    for i, fill in enumerate([0.0, float("nan"), float("nan"), 0, 0, 0]):
        shape = [max(x[i].shape[d] for x in inputs) for d in range(inputs[0][i].dim())]
        static.append(torch.full(shape, fill, dtype=inputs[0][i].dtype, device="cuda"))
    scale = inputs[0][6]

    def load(tensors):
        for buf, new in zip(static, tensors[:6]):
            buf.fill_(0 if buf.dtype == torch.int32 else float("nan"))
            buf[tuple(slice(0, n) for n in new.shape)].copy_(new)

    load(inputs[0])
    paged_attention_triton(*static, scale, decode_config=decode_config)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_triton(*static, scale, decode_config=decode_config)
    for case, tensors in zip(cases, inputs):
        load(tensors)
        graph.replay()
        torch.cuda.synchronize()
        assert (static[0].shape[0] == static[3].shape[0]) == (case.q_lens == [1] * len(case.q_lens))
        check(case, out.clone(), (*static, scale))


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1, 1], [9, 1, 24]), ([5, 1, 8], [5, 12, 20])])
def test_opcheck(device, q_lens, seq_lens):
    case = Case(q_lens, seq_lens, num_kv_heads=2, group=2, head_dim=16, block_size=8, dtype=torch.float32, seed=1)
    query, k_cache, v_cache, block_tables, seq_lens_t, query_start_loc, scale = build(case, device)
    # opcheck compares inputs before and after the call; NaN never equals itself, so poison with large values here.
    k_cache = torch.nan_to_num(k_cache, nan=1e4)
    v_cache = torch.nan_to_num(v_cache, nan=-1e4)
    torch.library.opcheck(torch.ops.cinfer.paged_attention.default,
                          (query, k_cache, v_cache, block_tables, seq_lens_t, query_start_loc, scale))
