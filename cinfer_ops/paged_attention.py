"""``cinfer::paged_attention``: causal attention of each sequence's new queries over its paged K/V context.

Layout (DESIGN.md): query/output ``[num_tokens, num_heads, head_dim]``, caches
``[num_blocks, block_size, num_kv_heads, head_dim]``, ``block_tables`` int32 ``[batch, max_blocks_per_seq]``,
``seq_lens`` int32 ``[batch]`` (context length including this step's tokens), ``query_start_loc`` int32
``[batch + 1]``. Query ``i`` of sequence ``b`` sees context positions ``j <= seq_lens[b] - q_len[b] + i``.
Nothing past a sequence's context (slots, block-table entries) is ever read.

With programmatic dependent launch (``cinfer_ops.pdl``) the decode kernel reads ``query_start_loc`` and
``seq_lens`` (and ``rope_paged_attention``'s ``slot_mapping``) before it waits for the previous kernel: they must
not be written by a kernel that may still run when this one starts, i.e. by the kernel just before it in the stream
or one launched with PDL before that (a step's inputs, copied in before its kernels, are fine).
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from cinfer_ops.launch import launch
from cinfer_ops.launch import num_sms as _num_sms  # a module attribute: tests set other SM counts
from cinfer_ops.pdl import pdl_launch_dependents, pdl_launch_options, pdl_start, pdl_wait


def _check(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
           query_start_loc: Tensor) -> None:
    """Shapes and index dtypes of the op's arguments (shared with ``rope_paged_attention``); ValueError names the
    first one that is wrong."""
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must both be [blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    num_heads, head_dim = query.shape[1:]
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_heads}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [batch, max_blocks_per_seq], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    batch = block_tables.shape[0]
    if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [{batch}] (block_tables' batch), got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    if query_start_loc.shape != (batch + 1,) or query_start_loc.dtype != torch.int32:
        raise ValueError(f"query_start_loc must be int32 [{batch + 1}], got {query_start_loc.dtype} "
                         f"{tuple(query_start_loc.shape)}")


def paged_attention_reference(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                              seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> Tensor:
    """Per-sequence dense attention over gathered pages, computed in fp32 (GQA by grouping, never copying K/V)."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for b, ctx in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        blocks = block_tables[b, : (ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:ctx].float()
        v = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:ctx].float()
        q = query[start:end].float().view(q_len, kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", q, k) * scale
        last_visible = ctx - q_len + torch.arange(q_len, device=query.device)
        visible = torch.arange(ctx, device=query.device)[None, :] <= last_visible[:, None]
        scores.masked_fill_(~visible, float("-inf"))
        o = torch.einsum("hgqk,khd->qhgd", scores.softmax(-1), v)
        out[start:end] = o.reshape(q_len, num_heads, head_dim).to(query.dtype)
    return out


_LOG2E = 1.4426950408889634


KV_GATHERS = ("key", "page")
GRID_ORDERS = ("token", "head", "split")
MERGES = ("head", "group", "fused")


@dataclass(frozen=True)
class DecodeConfig:
    """The split-KV decode kernel's tiling, split sizing and structural variants.

    Tiling: ``block_n`` keys per step (a power of two >= 16), ``num_warps``, ``num_stages``. On an H100 the
    --decode-sweep found 2 stages as fast as 5-7 (the default uses 2).

    Split sizing, from shapes only (CUDA-graph safe): ``partition_size`` keys per split, or None to size it from the
    grid, with ``target = programs_per_sm * SMs`` (token, kv_head, split) programs:
    - (token, kv_head) pairs <= target: as many splits as keep the programs within target. With target at 2 per
      SM, every program is resident from the start (the default tiling fits 3 per SM) and streams one long run of
      keys: no wave of splits trails behind the others, and few partials are written and merged;
    - pairs <= 2 * target: 2 splits, so that the programs make about 2-4 waves instead of 1-2, whose tail costs more;
    - more pairs: 1 split, already several waves.
    No split is shorter than the least partition, ``short_partition`` keys while the pairs are at most a quarter of
    target (short splits then buy parallelism) and ``min_partition`` above that (where they only add partial
    writes and merges), and there are at most ``max_splits``.
    ``fit_splits``: each token spreads its own context over those splits (on the device, so still CUDA-graph safe),
    in partitions no shorter than the least and no longer than the sized one. The runtime's block tables are
    ``max_model_len`` wide: without it a context far shorter than the table fills one split and leaves the others
    idle; a context as long as the table gets the sized partition either way.
    (H100 sweeps of 2026-11-26, RESULTS.md runs AY-BF: at 32-256 pairs, 256 programs were 1.2-3.9% faster than
    the 1024-1280 of the earlier rule, which aimed at programs_per_sm * SMs programs rounded up, and 2 splits were
    fastest at 512 pairs; fitted splits of 128 keys at least made batch 1-8 over 8192-key tables 3-31% faster.)

    Variants (the defaults are the original kernel):
    - ``kv_gather``: how a tile's K/V rows are found. "key": one block-table load per key. "page": one per page,
      broadcast to the page's keys.
    - ``grid_order``: the grid's fastest axis. "token" (then kv head, then split). "head": the kv heads of one
      token run side by side, so each page's rows (all kv heads) are read at about the same time. "split": the
      splits of one (token, kv head) run side by side and finish together.
    - ``merge``: how split partials are combined. "head": a second kernel, one program per (token, query head).
      "group": a second kernel, one program per (token, kv head), reading its query heads x many splits as one
      tile. "fused": no second kernel: the last split of each (token, kv head) to finish merges (an atomic
      counter, which it then resets: the counters persist across launches, see ``_merge_counter``), and a token
      whose context fits one split writes its output directly.
    - ``direct_single_split``: with the "head"/"group" merges, a token whose context fits one split writes its
      output directly and the merge skips it ("fused" always does).

    Wave tiling (``wave_block_n``, 0 = off): a step of more (token, kv_head) pairs than this tiling keeps resident
    (``resident`` programs per SM), and at most ``wave_resident`` per SM (0: no bound), runs one split per pair with
    ``wave_block_n`` keys per step and ``wave_num_warps`` warps (0: ``num_warps``), a tiling that keeps more
    programs resident. With the default tiling such a step runs 1.3 waves or more, or 2 splits and their merges.
    On sm_90 at head_dim 128, bn128 w4 s2 keeps 3 programs per SM (128 registers, 72 KiB of shared memory; 158
    registers in the split variant) and the wave tiling bn32 w1 s2 keeps 10 (195 registers, 20 KiB; bn32 w2 keeps
    8), so batch 50 and up for 8 kv heads on 132 SMs take bn32 w1: more, smaller programs per SM keep more K/V
    streams in flight. In a step of fewer programs the longer chain of small tiles costs more than it saves, so the
    band starts where bn128 no longer fits every program at once.
    (H100, 2026-11-27, RESULTS.md runs CK-CO, blocks as the runtime's block manager lays them out, x SDPA: batch 64
    at 4096 keys 0.994x against 0.981x for the band's tiling before, bn64 w4 up to batch 82; batch 64 at 384 keys
    over an 8192-key table 1.010x against 0.987x; batch 256 at 512 keys 0.998x against 0.993x; Llama-3-8B
    generation at batch 128 2.8% more tokens/s. With every block in a random place the change is mixed, -1.3% to
    +2.4%. At batch 32 and 384 keys, outside the band, bn32 w2 was 12% slower than bn128 w4. Runs CX and CY: one
    warp instead of 2 was faster at 12 of 14 band shapes, 0.3-1.9%, geomean x SDPA 1.005 against 0.997; 0.6% slower
    at batch 80 over 4096 keys. A deeper pipeline for long runs of keys gained nothing: 3 or 4 stages timed the same.)
    """
    block_n: int
    num_warps: int
    num_stages: int
    partition_size: int | None = None
    programs_per_sm: int = 2
    min_partition: int = 512
    short_partition: int = 128
    max_splits: int = 128
    kv_gather: str = "key"
    grid_order: str = "token"
    merge: str = "head"
    direct_single_split: bool = False
    fit_splits: bool = True
    resident: int = 3
    wave_block_n: int = 0
    wave_num_warps: int = 0
    wave_resident: int = 5

    def __post_init__(self):
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.wave_block_n and (self.wave_block_n < 16 or self.wave_block_n & (self.wave_block_n - 1)):
            raise ValueError(f"wave_block_n must be 0 or a power of two >= 16, got {self.wave_block_n}")
        if self.partition_size is not None and self.partition_size < 1:
            raise ValueError(f"partition_size must be positive or None, got {self.partition_size}")
        if self.wave_num_warps < 0 or self.wave_num_warps & (self.wave_num_warps - 1):
            raise ValueError(f"wave_num_warps must be 0 or a power of two, got {self.wave_num_warps}")
        if self.wave_resident < 0:
            raise ValueError(f"wave_resident must be >= 0, got {self.wave_resident}")
        for name in ("programs_per_sm", "min_partition", "short_partition", "max_splits", "resident"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("kv_gather", KV_GATHERS), ("grid_order", GRID_ORDERS), ("merge", MERGES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class PrefillConfig:
    """Flash kernel tiling: ``block_m`` rows (query tokens x the packed query heads of one kv head) by ``block_n`` keys."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Keyed by head_dim rounded up to a power of two: the smallest key >= it applies. Tune with
# benchmarks/tune_paged_attention.py on the target GPU (--decode-sweep: the split-KV kernel's knobs and variants).
# Head_dim 128: decode from the H100 --decode-sweep of 2026-11-26 (the best single config over the three issue
# shapes: 0.97x SDPA enable_gqa, 90-95% of copy bandwidth, against 0.95-0.97x for the earlier default; the fused
# merge also saves small decode batches the merge kernel's launch; split sizing: DecodeConfig, from runs AY-BF; the
# wave tiling for large steps, bn32 w1: runs CK-CO and CX-CY of 2026-11-27);
# prefill picked on an H200 (triton 3.6), 8x2048 causal at 316 TFLOP/s. The 64 and 256 rows are scaled from it,
# untuned, except head_dim 64's wave tiling, bn64 w2: the best single wave tiling of the H100 sweep of run CT
# (2026-11-27; 0.961-0.988x SDPA at b64 @ 384 and 4096, b128 and b256 @ 512, against 0.940-0.960x without).
DECODE_CONFIGS = {
    64: DecodeConfig(block_n=128, num_warps=4, num_stages=2, grid_order="head", merge="fused", wave_block_n=64,
                     wave_num_warps=2, wave_resident=0),
    128: DecodeConfig(block_n=128, num_warps=4, num_stages=2, grid_order="head", merge="fused", wave_block_n=32,
                      wave_num_warps=1, wave_resident=0),
    # Untuned: the split sizing closest to the one it had before run AZ (16 programs per SM, 512 keys at least).
    256: DecodeConfig(block_n=32, num_warps=4, num_stages=3, programs_per_sm=16, short_partition=512),
}
PREFILL_CONFIGS = {
    64: PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    128: PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    256: PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2),
}
# Width of the vector the sequence search (_count_le) reads query_start_loc with; larger batches loop. Fixed, not
# sized from the batch: a constexpr that followed the batch would compile a kernel variant per batch-size class
# (during serving, or per CUDA-graph bucket at capture). 128 covers the usual decode batches in one load.
_SEARCH_CHUNK = 128
_SPLIT_CHUNK = 16
# Elements of the [query heads, splits, head_dim] tile the group merges read per step (sets the splits per step).
_MERGE_TILE_ELEMENTS = 8192
# Caches with at least this many elements are addressed with 64-bit offsets (a module constant so tests can lower it).
_INT32_OFFSET_LIMIT = 2**31
# Kernel variants: every constexpr and launch option below comes from the model's shapes, the cache and the config;
# the step's size enters only as the decode kernel's SPLIT (several splits or one) under the "head" and "group"
# merges, where it follows the batch (see DecodeConfig's split sizing; the fused merge, the default, fixes it
# from the table width), and as the wave tiling of the batches in its band (decode_variant_batches names
# them). Integer arguments that follow the step's size (batch, token and split counts) are marked
# do_not_specialize: Triton would otherwise compile a variant for the value 1 and one for multiples of 16. They
# only bound loops and masks and scale partial-buffer rows, where those hints buy nothing.


@triton.jit
def _count_le(qsl_ptr, x, k_lo, k_hi, DIV: tl.constexpr, ADD_INDEX: tl.constexpr, CHUNK: tl.constexpr):
    # Number of k in [k_lo, k_hi) with qsl[k] // DIV + (k if ADD_INDEX) <= x. The keys grow with k, so this is
    # the index of the sequence that owns x: a search on the device, no host sync, one vector load per CHUNK.
    count = x * 0
    for k0 in range(k_lo, k_hi, CHUNK):
        k = k0 + tl.arange(0, CHUNK)
        inside = k < k_hi
        key = tl.load(qsl_ptr + k, mask=inside, other=0)
        if DIV > 1:
            key = key // DIV
        if ADD_INDEX:
            key = key + k
        count += tl.sum((inside & (key <= x)).to(tl.int32), axis=0)
    return count


@triton.jit
def _attend_block(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset, n0, kv_stop,
                  row_limit, qk_scale, stride_cb, stride_cs,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  MASK_KV: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  INT64_OFFSETS: tl.constexpr, KV_GATHER: tl.constexpr):
    # One online-softmax step of the rows of q over keys [n0, n0 + BLOCK_N), gathered through the block table.
    # n0 is a multiple of BLOCK_N and below kv_stop. MASK_KV: keys at or past kv_stop are neither loaded (their
    # block-table entries and slots may be garbage or NaN) nor scored. CAUSAL: row r also scores only keys
    # <= row_limit[r]. Scores are in log2 units.
    # UPCAST_DOT: feed the dots fp32 copies of 16-bit operands (exact products, so the same arithmetic); Triton's
    # interpreter multiplies bf16 dot operands as raw bits (seen with triton 3.9). INT64_OFFSETS: cache offsets
    # need 64 bits; 32-bit address arithmetic is cheaper in the hot loop when the cache is small enough.
    # KV_GATHER (DecodeConfig.kv_gather): 0 one block-table load per key; 1 one per page, broadcast to its keys.
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    kv_ok = offs_n < kv_stop
    if KV_GATHER == 0:
        if MASK_KV:
            block = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=kv_ok, other=0)
        else:
            block = tl.load(block_table_ptr + offs_n // BLOCK_SIZE)
    elif BLOCK_N > BLOCK_SIZE:
        offs_p = n0 // BLOCK_SIZE + tl.arange(0, BLOCK_N // BLOCK_SIZE)
        if MASK_KV:
            pages = tl.load(block_table_ptr + offs_p, mask=offs_p * BLOCK_SIZE < kv_stop, other=0)
        else:
            pages = tl.load(block_table_ptr + offs_p)
        block = tl.reshape(tl.broadcast_to(pages[:, None], [BLOCK_N // BLOCK_SIZE, BLOCK_SIZE]), [BLOCK_N])
    else:
        block = tl.load(block_table_ptr + n0 // BLOCK_SIZE)  # the whole tile lies in one page
    if INT64_OFFSETS:
        block = block.to(tl.int64)
    rows = block * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kv_head_offset
    offsets = rows[:, None] + offs_d[None, :]
    if MASK_KV or D_PAD != HEAD_DIM:
        mask = kv_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=mask, other=0.0)
    else:
        k = tl.load(k_cache_ptr + offsets)
        v = tl.load(v_cache_ptr + offsets)
    if UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= row_limit[:, None], s, float("-inf"))
    elif MASK_KV:
        s = tl.where(kv_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if CAUSAL:
        # A row may have seen no key yet; exponentiate against 0 then so that -inf - -inf never makes a NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = p.to(v.dtype)  # P in the input dtype, as the tensor cores take it
    if UPCAST_DOT:
        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _rope_rows(row_ptrs, offs_d, mask, cos_row_ptr, sin_row_ptr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    # HF's x * cos + rotate_half(x) * sin of rows x (row_ptrs[..., None] + offs_d), in fp32, rounded once to x's
    # dtype, as rope_kv_cache_write computes it: element d pairs with d + HALF (minus, first half) or d - HALF.
    d_ok = offs_d < HEAD_DIM
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    cos = tl.load(cos_row_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_row_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    x = tl.load(row_ptrs + offs_d, mask=mask, other=0.0)
    x_partner = tl.load(row_ptrs + partner, mask=mask, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * cos + (sign * x_partner) * sin).to(x.dtype)


@triton.jit
def _merge_group(part_out_ptr, part_lse_ptr, out_ptr, token64, kv_head, n_splits, num_heads, num_splits,
                 stride_ot, stride_oh, GROUP: tl.constexpr, GM_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                 D_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr, ALL_WRITTEN: tl.constexpr):
    # Log-sum-exp merge of splits [0, n_splits) of the GROUP query heads of kv_head, in one pass: each step reads
    # SPLIT_CHUNK splits of every head as one [GM_PAD, SPLIT_CHUNK, D_PAD] tile and rescales the running sums.
    # ALL_WRITTEN: every split below n_splits wrote its partial (the fused merge), so the output loads need not
    # wait for the lse loads; otherwise a split whose lse is -inf wrote no output, which must not be read.
    # Loads bypass L1 (".cg"): in the fused merge other programs wrote these rows during this kernel.
    offs_g = tl.arange(0, GM_PAD)
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, D_PAD)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    first = (token64 * num_heads + heads) * num_splits  # [GM_PAD] partial row of each head's split 0
    m = tl.full([GM_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GM_PAD], tl.float32)
    acc = tl.zeros([GM_PAD, D_PAD], tl.float32)
    for s0 in range(0, n_splits, SPLIT_CHUNK):
        split = s0 + offs_s
        ok = g_ok[:, None] & (split < n_splits)[None, :]
        row = first[:, None] + split[None, :]
        lse = tl.load(part_lse_ptr + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
        if ALL_WRITTEN:
            written = ok
        else:
            written = lse > float("-inf")
        part = tl.load(part_out_ptr + row[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                       mask=written[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split seen yet (or a padding row): no NaN
        alpha = tl.exp2(m - m_ref)
        w = tl.exp2(lse - m_ref[:, None])
        denom = denom * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(part * w[:, :, None], 1)
        m = m_new
    o = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + token64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["batch", "num_tokens", "num_splits"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, merge_count_ptr,
    key_ptr, value_ptr, cos_ptr, sin_ptr, slot_mapping_ptr,
    qk_scale, batch, num_tokens, num_kv_heads, num_heads, num_splits, partition_size, min_partition,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, GM_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_CHUNK: tl.constexpr, SPLIT: tl.constexpr,
    GRID_ORDER: tl.constexpr, KV_GATHER: tl.constexpr, MERGE: tl.constexpr, DIRECT: tl.constexpr,
    FIT: tl.constexpr, MERGE_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, INT64_OFFSETS: tl.constexpr, USE_PDL: tl.constexpr,
    ROPE: tl.constexpr, HALF: tl.constexpr,
):
    # PDL (cinfer_ops.pdl): the step's inputs query_start_loc, seq_lens and slot_mapping are read before the wait,
    # while the previous kernel runs (see the module doc); q, k, v, cos/sin and the caches after it.
    # ROPE (rope_paged_attention): q, and the new key of the split that holds it, are rotated here (see there).
    pdl_launch_dependents(USE_PDL)
    # Program (token, kv_head, split): the GROUP query heads of kv_head for one query token are the rows of the
    # dots, so each K/V tile is read once per kv head. The split covers keys [split * partition_size, + partition_size)
    # of the token's visible context. Any token works (it need not be its sequence's only one), so this kernel is
    # correct for every query_start_loc; the launcher uses it when num_tokens == batch.
    # SPLIT: there are several splits; each writes a normalised partial output and its log2-sum-exp, merged by a
    # second kernel or (MERGE == 2) by the last split to finish. DIRECT: a token whose context fits one split
    # writes its output directly (split 1 is then empty, which the merge kernels check). GRID_ORDER: which of
    # token (0, a 3-D grid), kv head (1) or split (2) is the fastest axis of a 1-D grid.
    if GRID_ORDER == 0:
        token = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
    elif GRID_ORDER == 1:
        pid = tl.program_id(0)
        kv_head = pid % num_kv_heads
        token = (pid // num_kv_heads) % num_tokens
        split = pid // (num_kv_heads * num_tokens)
    else:
        pid = tl.program_id(0)
        split = pid % num_splits
        kv_head = (pid // num_splits) % num_kv_heads
        token = pid // (num_splits * num_kv_heads)
    # Decode steps have token == sequence: try that first, with independent loads, and search only if it is wrong
    # (saves a dependent global-memory round trip before the first K/V load).
    q_start = tl.load(query_start_loc_ptr + token, mask=token < batch, other=0)
    q_end = tl.load(query_start_loc_ptr + token + 1, mask=token < batch, other=0)
    ctx = tl.load(seq_lens_ptr + token, mask=token < batch, other=0)
    seq = token
    if (token < q_start) | (token >= q_end):
        seq = _count_le(query_start_loc_ptr, token, 1, batch + 1, 1, False, SEARCH_CHUNK)
        q_start = tl.load(query_start_loc_ptr + seq, mask=seq < batch, other=0)
        q_end = tl.load(query_start_loc_ptr + seq + 1, mask=seq < batch, other=0)
        ctx = tl.load(seq_lens_ptr + seq, mask=seq < batch, other=0)
    real = seq < batch  # tokens past query_start_loc[-1] are CUDA-graph padding
    kv_len = tl.where(real, ctx - (q_end - q_start) + (token - q_start) + 1, 0)
    if FIT:  # DecodeConfig.fit_splits: this token's context over the splits, least <= it <= partition_size
        per_split = (kv_len + num_splits - 1) // num_splits
        per_split = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        partition_size = tl.minimum(partition_size, tl.maximum(per_split, min_partition))
    kv_start = split * partition_size
    kv_stop = tl.minimum(kv_start + partition_size, kv_len)
    n_active = tl.minimum((kv_len + partition_size - 1) // partition_size, num_splits)  # splits that see a key

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    heads = kv_head * GROUP + offs_g
    row_ok = offs_g < GROUP
    io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    token64 = token.to(tl.int64)
    out_rows = out_ptr + token64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    part_row = (token64 * num_heads + heads) * num_splits + split  # [G_PAD] rows of the partial buffers
    if ROPE:  # rope_paged_attention: this token's new key goes to its slot, the last position of its context
        slot = tl.load(slot_mapping_ptr + token, mask=token < num_tokens, other=-1)
        new_pos = tl.where((slot >= 0) & (kv_start < kv_len) & (kv_stop == kv_len), kv_len - 1, -1)
    pdl_wait(USE_PDL)
    if kv_start < kv_len:
        q_rows = q_ptr + token64 * stride_qt + heads[:, None] * stride_qh
        if ROPE:
            cos_row = cos_ptr + token64 * stride_cos
            sin_row = sin_ptr + token64 * stride_sin
            q = _rope_rows(q_rows, offs_d[None, :], io_mask, cos_row, sin_row, HALF, HEAD_DIM)
        else:
            q = tl.load(q_rows + offs_d[None, :], mask=io_mask, other=0.0)
        block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
        if INT64_OFFSETS:
            kv_head_offset = kv_head.to(tl.int64) * stride_ch
        else:
            kv_head_offset = kv_head * stride_ch
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        if ROPE:
            # The split that holds the new key rotates it and writes it and the value to the slot. It scores them
            # from registers, first (the online softmax starts from that one key), and its tiles stop one key
            # short: the slot is never read, which this program's own store need not have reached.
            has_new = new_pos >= 0
            new_mask = offs_d < tl.where(has_new, HEAD_DIM, 0)
            new_k = _rope_rows(key_ptr + token64 * stride_kt + kv_head * stride_kh, offs_d, new_mask,
                               cos_row, sin_row, HALF, HEAD_DIM).to(k_cache_ptr.dtype.element_ty)
            new_v = tl.load(value_ptr + token64 * stride_vt + kv_head * stride_vh + offs_d, mask=new_mask, other=0.0)
            new_v = new_v.to(v_cache_ptr.dtype.element_ty)
            slot_offset = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head_offset
                           + offs_d)
            tl.store(k_cache_ptr + slot_offset, new_k, mask=new_mask)
            tl.store(v_cache_ptr + slot_offset, new_v, mask=new_mask)
            s_new = tl.sum(q.to(tl.float32) * new_k.to(tl.float32)[None, :], 1) * qk_scale
            m_i = tl.where(has_new, s_new, m_i)
            l_i = tl.where(has_new, 1.0, l_i)  # exp2(s_new - m_i), exact in any dtype, as P is rounded in the tiles
            acc = tl.where(has_new, tl.zeros([G_PAD, D_PAD], tl.float32) + new_v.to(tl.float32)[None, :], acc)
            kv_stop = tl.where(has_new, kv_stop - 1, kv_stop)
        full_stop = kv_start + (kv_stop - kv_start) // BLOCK_N * BLOCK_N
        for n0 in range(kv_start, full_stop, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
                                          n0, kv_stop, m_i, qk_scale, stride_cb, stride_cs,
                                          BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, False, False, DOT_PRECISION, UPCAST_DOT,
                                          INT64_OFFSETS, KV_GATHER)
        for n0 in range(full_stop, kv_stop, BLOCK_N):  # the ragged last tile, if any
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
                                          n0, kv_stop, m_i, qk_scale, stride_cb, stride_cs,
                                          BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, True, False, DOT_PRECISION, UPCAST_DOT,
                                          INT64_OFFSETS, KV_GATHER)
        # kv_start < kv_len: every row scored at least one key, so l_i > 0.
        o = acc / l_i[:, None]
        if SPLIT:
            direct = False
            if DIRECT:
                direct = n_active == 1
            if direct:
                tl.store(out_rows, o.to(out_ptr.dtype.element_ty), mask=io_mask)
            else:
                tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=io_mask)
                tl.store(part_lse_ptr + part_row, m_i + tl.log2(l_i), mask=row_ok)
                if MERGE == 2:
                    # The last of the token's n_active splits to get here merges them. The barrier orders every
                    # thread's partial stores before the (one-thread, release) increment; the acquire side of
                    # the increment orders the last program's reads after everyone's stores.
                    tl.debug_barrier()
                    count_ptr = merge_count_ptr + token64 * num_kv_heads + kv_head
                    done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
                    if done == n_active - 1:
                        _merge_group(part_out_ptr, part_lse_ptr, out_ptr, token64, kv_head, n_active, num_heads,
                                     num_splits, stride_ot, stride_oh, GROUP, GM_PAD, HEAD_DIM, D_PAD, MERGE_CHUNK, True)
                        # All n_active splits have counted, so nothing else touches this counter in this launch:
                        # zero it for the next launch (the counters persist, see _merge_counter). Kernel
                        # boundaries order it before any later launch's increments.
                        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
        else:
            tl.store(out_rows, o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # Nothing visible in this split (past the context, or a padding token).
        zeros = tl.zeros([G_PAD, D_PAD], tl.float32).to(out_ptr.dtype.element_ty)
        if SPLIT:
            if DIRECT:
                if split == 0:  # an empty context: the output is 0 (finite), and the merge skips the token
                    tl.store(out_rows, zeros, mask=io_mask)
                elif MERGE != 2:
                    tl.store(part_lse_ptr + part_row, tl.full([G_PAD], float("-inf"), tl.float32), mask=row_ok)
            else:  # a neutral partial result
                tl.store(part_lse_ptr + part_row, tl.full([G_PAD], float("-inf"), tl.float32), mask=row_ok)
        else:
            tl.store(out_rows, zeros, mask=io_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_heads, num_splits, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr, DIRECT: tl.constexpr):
    # Program (token, head): log-sum-exp merge of the per-split normalised outputs. DIRECT: a token whose split 1
    # is empty had its output written by split 0.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = (token * num_heads + head) * num_splits
    merge = True
    if DIRECT:
        merge = tl.load(part_lse_ptr + base + 1) != float("-inf")
    if merge:
        m_vec = tl.full([SPLIT_CHUNK], float("-inf"), tl.float32)
        for s0 in range(0, num_splits, SPLIT_CHUNK):
            offs_s = s0 + tl.arange(0, SPLIT_CHUNK)
            lse = tl.load(part_lse_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
            m_vec = tl.maximum(m_vec, lse)
        m = tl.max(m_vec, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row with no visible key (padding): output 0, not NaN
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        denom = tl.zeros([SPLIT_CHUNK], tl.float32)
        acc = tl.zeros([D_PAD], tl.float32)
        for s0 in range(0, num_splits, SPLIT_CHUNK):
            offs_s = s0 + tl.arange(0, SPLIT_CHUNK)
            lse = tl.load(part_lse_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
            w = tl.exp2(lse - m)
            # Splits past the context wrote no output (their lse is -inf, w == 0): don't read it.
            part = tl.load(part_out_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                           mask=(w > 0)[:, None] & d_ok[None, :], other=0.0)
            denom += w
            acc += tl.sum(part * w[:, None], 0)
        total = tl.sum(denom, 0)
        o = acc / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_groups_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_heads, num_splits, stride_ot, stride_oh,
                         GROUP: tl.constexpr, GM_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                         SPLIT_CHUNK: tl.constexpr, DIRECT: tl.constexpr):
    # Program (token, kv_head): the merge of its GROUP query heads (see _merge_group). DIRECT: as above.
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    merge = True
    if DIRECT:
        merge = tl.load(part_lse_ptr + (token * num_heads + kv_head * GROUP) * num_splits + 1) != float("-inf")
    if merge:
        _merge_group(part_out_ptr, part_lse_ptr, out_ptr, token, kv_head, num_splits, num_heads, num_splits,
                     stride_ot, stride_oh, GROUP, GM_PAD, HEAD_DIM, D_PAD, SPLIT_CHUNK, False)


@triton.jit(do_not_specialize=["batch"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    qk_scale, batch,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEADS_PER_TILE: tl.constexpr, HEAD_CHUNKS: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SEARCH_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    # Program (tile, kv_head x head chunk). A tile is TOKENS_PER_TILE consecutive query tokens of one sequence
    # times HEADS_PER_TILE query heads sharing kv_head: row r is token r // HEADS_PER_TILE, head r % HEADS_PER_TILE,
    # so each K/V tile is loaded once for the whole GQA group.
    # Sequence b's tiles are numbered from query_start_loc[b] // TOKENS_PER_TILE + b on: those ranges are disjoint,
    # increasing in b and all below num_tokens // TOKENS_PER_TILE + batch, the grid size, so the grid comes from
    # shapes alone; a program in a gap between two ranges exits.
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_CHUNKS
    chunk = tl.program_id(1) % HEAD_CHUNKS
    seq = _count_le(query_start_loc_ptr, tile_id, 1, batch, TOKENS_PER_TILE, True, SEARCH_CHUNK)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx = tl.load(seq_lens_ptr + seq)
    num_tiles = (q_len + TOKENS_PER_TILE - 1) // TOKENS_PER_TILE
    local = tile_id - (q_start // TOKENS_PER_TILE + seq)
    if (local >= 0) & (local < num_tiles):
        tile = num_tiles - 1 - local  # a sequence's last tile sees the most keys: start it first
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        tok = offs_m // HEADS_PER_TILE
        head = chunk * HEADS_PER_TILE + offs_m % HEADS_PER_TILE
        q_idx = tile * TOKENS_PER_TILE + tok
        row_ok = (tok < TOKENS_PER_TILE) & (q_idx < q_len) & (head < GROUP)
        # Rows that hold no query behave like the tile's last real token (never stored), so that every row
        # sees key 0 first and none stays at -inf.
        q_idx = tl.minimum(q_idx, q_len - 1)
        row_limit = ctx - q_len + q_idx  # last visible key of each row
        io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        tokens64 = (q_start + q_idx).to(tl.int64)
        heads = kv_head * GROUP + tl.minimum(head, GROUP - 1)
        q = tl.load(q_ptr + tokens64[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        first_limit = ctx - q_len + tile * TOKENS_PER_TILE
        last_limit = ctx - q_len + tl.minimum(tile * TOKENS_PER_TILE + TOKENS_PER_TILE, q_len) - 1
        # Keys below full_stop are visible to every row: no masks there. Only the diagonal band is masked.
        full_stop = tl.maximum(first_limit + 1, 0) // BLOCK_N * BLOCK_N
        kv_stop = last_limit + 1
        block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
        kv_head_offset = kv_head * stride_ch
        if INT64_OFFSETS:
            kv_head_offset = kv_head.to(tl.int64) * stride_ch
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for n0 in range(0, full_stop, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
                                          n0, kv_stop, row_limit, qk_scale, stride_cb, stride_cs,
                                          BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, False, False, DOT_PRECISION, UPCAST_DOT, INT64_OFFSETS, 0)
        for n0 in range(full_stop, kv_stop, BLOCK_N):
            m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
                                          n0, kv_stop, row_limit, qk_scale, stride_cb, stride_cs,
                                          BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, True, True, DOT_PRECISION, UPCAST_DOT, INT64_OFFSETS, 0)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tokens64[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)


def _pick(configs: dict, d_pad: int):
    return configs[min((k for k in configs if k >= d_pad), default=max(configs))]


# fp32 K/V tiles of at most this many elements (block_n x padded head_dim) per decode step.
_FP32_DECODE_TILE = 2048


@functools.lru_cache(maxsize=None)
def default_decode_config(d_pad: int, dtype: torch.dtype) -> DecodeConfig:
    """The decode tiling for this padded head_dim and dtype: ``DECODE_CONFIGS``' row, whose tiles were sized for
    16-bit K/V. fp32 dots run as exact FMAs (``DOT_PRECISION`` "ieee"), and at those tiles the sm_90 kernel spills
    (triton 3.6: 7.8 KB of stack a thread at head_dim 128 with bn128, 255 registers and 0.5 KB with bn64). So fp32
    takes tiles of ``_FP32_DECODE_TILE`` elements, which compile without spills (head_dim 64: bn32, 99 registers;
    128 and 256: bn16, 90 and 120), and no wave tiling (its resident counts are the 16-bit kernel's)."""
    cfg = _pick(DECODE_CONFIGS, d_pad)
    if dtype != torch.float32:
        return cfg
    return dataclasses.replace(cfg, block_n=max(16, min(cfg.block_n, _FP32_DECODE_TILE // d_pad)), wave_block_n=0)


def _tiles(keys: int, cfg: DecodeConfig) -> int:
    """keys rounded up to whole tiles of cfg.block_n."""
    return triton.cdiv(keys, cfg.block_n) * cfg.block_n


def _least_partition(pairs: int, cfg: DecodeConfig, num_sms: int) -> int:
    """The shortest split (keys, a multiple of cfg.block_n) a step of this many (token, kv_head) pairs may use."""
    return _tiles(cfg.short_partition if 4 * pairs <= cfg.programs_per_sm * num_sms else cfg.min_partition, cfg)


@functools.lru_cache(maxsize=64)
def _wave_config(cfg: DecodeConfig, max_context: int) -> DecodeConfig:
    """cfg's wave tiling at one split over a table of max_context keys (made once, not at every launch)."""
    return dataclasses.replace(cfg, block_n=cfg.wave_block_n, num_warps=cfg.wave_num_warps or cfg.num_warps,
                               partition_size=triton.cdiv(max_context, cfg.wave_block_n) * cfg.wave_block_n)


def _step_config(pairs: int, max_context: int, cfg: DecodeConfig, num_sms: int) -> DecodeConfig:
    """cfg, or for a step in its wave band (see DecodeConfig) the wave tiling at one split."""
    in_band = cfg.resident * num_sms < pairs and (not cfg.wave_resident or pairs <= cfg.wave_resident * num_sms)
    if cfg.wave_block_n and cfg.partition_size is None and in_band:
        return _wave_config(cfg, max_context)
    return cfg


def decode_variant_batches(max_batch: int, num_kv_heads: int, head_dim: int, device: torch.device,
                           decode_config: DecodeConfig | None = None,
                           dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """The smallest decode batch (<= max_batch) of each tiling the decode kernel takes with this config (default:
    ``default_decode_config`` for head_dim and the cache dtype): [1], or [1, b] where the wave band begins at b
    (a bounded band hands larger steps back to batch 1's tiling).
    A warm-up that runs a decode step of each (and of max_batch) compiles every decode variant a serving step can
    reach."""
    cfg = decode_config or default_decode_config(max(triton.next_power_of_2(head_dim), 16), dtype)
    sms = _num_sms(device)
    batches, seen = [], set()
    for batch in range(1, max_batch + 1):
        step = _step_config(batch * num_kv_heads, 1 << 20, cfg, sms)
        if (step.block_n, step.num_warps) not in seen:
            seen.add((step.block_n, step.num_warps))
            batches.append(batch)
    return batches


def _decode_partition(pairs: int, max_context: int, cfg: DecodeConfig, num_sms: int) -> tuple[int, int]:
    """(keys per split, the least keys per split), multiples of cfg.block_n, from shapes only: cfg.partition_size,
    or the split count of DecodeConfig's rule for this many (token, kv_head) pairs, within cfg's split limits."""
    least = _least_partition(pairs, cfg, num_sms)
    if cfg.partition_size is not None:
        partition = cfg.partition_size
    else:
        target = cfg.programs_per_sm * num_sms
        want = target // pairs if pairs <= target else 2 if pairs <= 2 * target else 1
        splits = max(1, min(want, max_context // least, cfg.max_splits))  # no split shorter than least
        partition = triton.cdiv(max_context, splits)
    return _tiles(partition, cfg), least


# The fused merge's arrival counters, one int32 per (token, kv_head), per device. Each launch leaves them all zero
# (the program that merges a group resets its counter), so no launch needs a fill kernel. Launches that share
# them must run in stream order, which one stream per device (the runtime's, CUDA graphs replayed on it) gives.
# Superseded, smaller buffers stay in the list: CUDA graphs captured over them keep using them.
_merge_counters: dict[torch.device, list[Tensor]] = {}
_MIN_MERGE_COUNTERS = 4096


def _merge_counter(size: int, device: torch.device) -> Tensor:
    """An all-zero int32 buffer of at least ``size`` elements, which the decode kernel leaves all zero."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" share one buffer list
        device = torch.device("cuda", torch.cuda.current_device())
    buffers = _merge_counters.setdefault(device, [])
    if buffers and buffers[-1].numel() >= size:
        return buffers[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A buffer made inside a capture belongs to the graph's memory pool, zeroed by a fill the graph replays:
        # use it for this graph only (the runner runs each bucket eagerly before capturing it, which grows the
        # shared buffer, so this is rare).
        return torch.zeros(size, dtype=torch.int32, device=device)
    grown = max(size, 2 * buffers[-1].numel() if buffers else _MIN_MERGE_COUNTERS)
    buffers.append(torch.zeros(grown, dtype=torch.int32, device=device))
    return buffers[-1]


def _merge_chunk(gm_pad: int, d_pad: int) -> int:
    """Splits per step of the group merges: a [gm_pad, chunk, d_pad] fp32 tile of about _MERGE_TILE_ELEMENTS."""
    chunk = max(2, _MERGE_TILE_ELEMENTS // (gm_pad * d_pad))
    return min(16, 1 << (chunk.bit_length() - 1))


def _launch_decode(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                   query_start_loc: Tensor, out: Tensor, cfg: DecodeConfig, qk_scale: float,
                   rope: tuple | None = None, **kernel_flags) -> None:
    """The split-KV kernel (and the merge of its splits) into out; kernel_flags: constexprs shared with prefill.
    rope: (key, value, cos, sin, slot_mapping) of rope_paged_attention (query is then the raw query), checked by
    it, key/value with unit last stride, cos/sin [num_tokens, head_dim] rows of unit last stride."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    batch = block_tables.shape[0]
    group = num_heads // kv_heads
    d_pad = max(triton.next_power_of_2(head_dim), 16)
    max_context = block_tables.shape[1] * block_size
    cfg = _step_config(batch * kv_heads, max_context, cfg, _num_sms(query.device))
    partition, least = _decode_partition(batch * kv_heads, max_context, cfg, _num_sms(query.device))
    num_splits = triton.cdiv(max_context, partition)
    fused = cfg.merge == "fused"
    # SPLIT: the kernel variant that can split. The fused merge lets a token whose context fits one split write
    # its output directly, so that variant also runs steps of one split: with it, the variant does not follow the
    # batch (whose split count rises and falls, see DecodeConfig), only whether this table width holds 2 splits
    # of the least partition at one sequence (the least grows with the batch).
    split = num_splits > 1 or (fused and cfg.partition_size is None and cfg.max_splits > 1
                               and max_context >= 2 * _least_partition(kv_heads, cfg, _num_sms(query.device)))
    gm_pad = max(triton.next_power_of_2(group), 2)
    part_out = part_lse = merge_count = None
    if split:
        part_out = torch.empty((num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device)
        if fused:
            merge_count = _merge_counter(num_tokens * kv_heads, query.device)
    if cfg.grid_order == "token":
        grid = (num_tokens, kv_heads, num_splits)
    else:
        grid = (num_tokens * kv_heads * num_splits,)
    key, value, cos, sin, slot_mapping = rope if rope is not None else (query,) * 4 + (seq_lens,)
    launch(_decode_kernel, grid,
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_lse, merge_count,
        key, value, cos, sin, slot_mapping,
        qk_scale, batch, num_tokens, kv_heads, num_heads, num_splits, partition,
        least,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), cos.stride(0), sin.stride(0),
        GROUP=group, G_PAD=max(triton.next_power_of_2(group), 16), GM_PAD=gm_pad, HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n, SPLIT=split,
        GRID_ORDER=GRID_ORDERS.index(cfg.grid_order), KV_GATHER=KV_GATHERS.index(cfg.kv_gather),
        MERGE=MERGES.index(cfg.merge), DIRECT=cfg.direct_single_split or fused,
        FIT=cfg.fit_splits and split and cfg.partition_size is None,
        MERGE_CHUNK=_merge_chunk(gm_pad, d_pad), ROPE=rope is not None, HALF=head_dim // 2,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kernel_flags,
    )
    if split and cfg.merge == "head":
        launch(_merge_splits_kernel, (num_tokens, num_heads),
            part_out, part_lse, out, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, SPLIT_CHUNK=_SPLIT_CHUNK, DIRECT=cfg.direct_single_split,
            num_warps=4 if d_pad >= 128 else 2,
        )
    elif split and cfg.merge == "group":
        launch(_merge_groups_kernel, (num_tokens, kv_heads),
            part_out, part_lse, out, num_heads, num_splits, out.stride(0), out.stride(1),
            GROUP=group, GM_PAD=gm_pad, HEAD_DIM=head_dim, D_PAD=d_pad, SPLIT_CHUNK=_merge_chunk(gm_pad, d_pad),
            DIRECT=cfg.direct_single_split, num_warps=4,
        )


def paged_attention_triton(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, query_start_loc: Tensor, scale: float, *,
                           decode_config: DecodeConfig | None = None,
                           prefill_config: PrefillConfig | None = None, rope: tuple | None = None) -> Tensor:
    """The Triton implementation of ``cinfer::paged_attention`` (same arguments and result; see the module doc).

    No host syncs and no data-dependent Python control flow: grids and the kernel choice come from shapes, so it
    can be captured in a CUDA graph. ``num_tokens == batch`` runs the split-KV decode kernel (plus the merge of
    its splits when there is more than one), anything else the tiled flash kernel; both are correct for any
    ``query_start_loc``. ``decode_config``/``prefill_config`` override the tiling and variants (tuning, tests).
    ``rope``: ``(key, value, cos, sin, slot_mapping)`` of ``rope_paged_attention`` for a decode step only, as
    ``_launch_decode`` takes them.
    """
    _check(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    batch = block_tables.shape[0]
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {query.dtype}"
    assert k_cache.dtype == v_cache.dtype == query.dtype, f"cache dtype {k_cache.dtype} != query dtype {query.dtype}"
    assert head_dim % 16 == 0 and head_dim <= 256, f"head_dim must be a multiple of 16 up to 256, got {head_dim}"
    assert block_size & (block_size - 1) == 0, f"block_size must be a power of two, got {block_size}"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, "k/v caches must share a unit-stride layout"
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    if query.stride(2) != 1:
        query = query.contiguous()
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0 or batch == 0:
        return out
    group = num_heads // kv_heads
    d_pad = max(triton.next_power_of_2(head_dim), 16)
    qk_scale = scale * _LOG2E
    dot_precision = "ieee" if query.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    upcast_dot = query.dtype == torch.bfloat16 and query.device.type != "cuda"  # the interpreter: see _attend_block
    int64_offsets = k_cache.numel() >= _INT32_OFFSET_LIMIT
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))

    assert rope is None or num_tokens == batch, "rope_paged_attention folds RoPE into the decode kernel only"
    if num_tokens == batch:
        _launch_decode(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
                       decode_config or default_decode_config(d_pad, query.dtype), qk_scale, rope,
                       SEARCH_CHUNK=_SEARCH_CHUNK,
                       DOT_PRECISION=dot_precision, UPCAST_DOT=upcast_dot, INT64_OFFSETS=int64_offsets,
                       **pdl_launch_options(query.device))
        return out

    cfg = prefill_config or _pick(PREFILL_CONFIGS, d_pad)
    heads_per_tile = min(group, cfg.block_m)
    head_chunks = triton.cdiv(group, heads_per_tile)
    tokens_per_tile = cfg.block_m // heads_per_tile
    grid = (num_tokens // tokens_per_tile + batch, kv_heads * head_chunks)
    launch(_prefill_kernel, grid,
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        qk_scale, batch,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), *cache_strides,
        GROUP=group, HEADS_PER_TILE=heads_per_tile, HEAD_CHUNKS=head_chunks, TOKENS_PER_TILE=tokens_per_tile,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SEARCH_CHUNK=_SEARCH_CHUNK, DOT_PRECISION=dot_precision, UPCAST_DOT=upcast_dot, INT64_OFFSETS=int64_offsets,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch_options(query.device),
    )
    return out


@torch.library.custom_op("cinfer::paged_attention", mutates_args=(), device_types="cpu")
def paged_attention(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float) -> Tensor:
    """Returns [num_tokens, num_heads, head_dim] in query.dtype; rows past query_start_loc[-1] are unspecified."""
    _check(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    return paged_attention_reference(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


@paged_attention.register_kernel("cuda")
def _(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
      query_start_loc: Tensor, scale: float) -> Tensor:
    return paged_attention_triton(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


@paged_attention.register_fake
def _(query: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
      query_start_loc: Tensor, scale: float) -> Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)
