"""Sweep tile configurations of the Triton paged-attention kernels on the GPU.

Decode (split-KV kernel): 32 query / 8 kv heads, head_dim 128, block 16 at (batch, context) = (64, 4096),
(8, 32768), (256, 512); reported as GB/s of K/V read and as a fraction of device copy bandwidth, next to SDPA over
contiguous K/V. Prefill (flash kernel): 8 sequences x 2048 tokens, causal; TFLOP/s next to SDPA's flash backend.
Every configuration is checked against the fp32 reference before it is timed.

    PYTHONPATH=. python benchmarks/tune_paged_attention.py --out results/tune [--quick] [--dtype bfloat16]

Prints one table per case and writes ``tune_paged_attention.json`` (all rows, the device, and the best
configuration per case) into ``--out``. Copy the winners into DECODE_CONFIGS / PREFILL_CONFIGS
in cinfer_ops/paged_attention.py.

Decode sweep (``--decode-sweep``, about 2 minutes on an H100): the split-KV kernel's tiling, launch knobs and
structural variants (every DecodeConfig field) at the same three shapes. Each candidate is checked against the
fp32 reference, then timed from CUDA-graph replays next to SDPA with enable_gqa over contiguous K/V of the same
shape (also graph replays). Stage 1 times a fixed list (decode_sweep_candidates); stage 2 applies, per shape, the
launch knobs / grid orders / merges that beat their reference in stage 1 to that shape's best tilings; finally the
fastest per shape, the best single configuration and the default are re-timed, interleaved with SDPA, with longer
runs. Worker processes compile every candidate first (into Triton's on-disk cache), so compiling is not serial.

    PYTHONPATH=. python benchmarks/tune_paged_attention.py --decode-sweep --out results/tune
    PYTHONPATH=. python benchmarks/tune_paged_attention.py --decode-sweep --smoke --out /tmp/tune  # CPU, tiny shapes

Prints per-shape tables and a summary (ms, % of copy bandwidth over the K/V bytes, ratio to SDPA, best config per
shape and the best single config over all three), and the registers, shared memory and resident programs per SM of
each decode kernel variant it compiled; writes ``tune_decode_sweep.json`` into ``--out`` after each stage.
``--candidates splits`` times the default tiling at fixed partition sizes instead (how many programs a step wants);
``--candidates occupancy`` times tilings that fit more programs per SM than the default, at several split targets;
``--candidates wave`` times the wave tilings (large steps) of the shapes' head_dim row, e.g. for head_dim 64:

    PYTHONPATH=. python benchmarks/tune_paged_attention.py --decode-sweep --candidates wave \
        --shapes b64x384w8192d64,b128x512w8192d64,b256x512d64,b64x4096d64 --out results/tune

The caches hold each sequence's blocks where the runtime's block manager puts them (``--layout runtime``, as
bench_ops' decode row) or in a random permutation (``--layout random``, as every sweep of sessions 1-10 had them).
"""
import argparse
import dataclasses
import functools
import itertools
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before cinfer_ops is imported: the kernels run in the interpreter

from benchmarks.common import (bench_ms, copy_bandwidth_gbps, device_info, print_table,  # noqa: E402
                               runtime_block_tables, write_json)
from cinfer_ops.paged_attention import (DECODE_CONFIGS, DecodeConfig, PrefillConfig,  # noqa: E402
                                        default_decode_config, paged_attention_triton)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_CASES = [(64, 4096), (8, 32768), (256, 512)]
PREFILL_CASE = (8, 2048)


def make_inputs(q_lens, seq_lens, dtype, device="cuda", seed=0):
    """Caches holding exactly the needed blocks, in a random physical order."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks)
    physical = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    block_tables = torch.zeros((len(seq_lens), max(blocks)), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(blocks):
        block_tables[b, :n] = physical[used:used + n]
        used += n
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    v_cache = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device=device)
    query = torch.randn((sum(q_lens), NUM_HEADS, HEAD_DIM), dtype=dtype, device=device, generator=gen)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return query, k_cache, v_cache, block_tables, seq_lens_t, qsl, HEAD_DIM ** -0.5


def dense_kv(args):
    """The same K/V gathered contiguous, [batch, kv_heads, ctx, head_dim] (all sequences the same length)."""
    _, k_cache, v_cache, block_tables, seq_lens, _, _ = args
    ctx = int(seq_lens[0])
    k = k_cache[block_tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = v_cache[block_tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    return k, v


def sdpa_ms(q, k, v, causal):
    """Fastest of SDPA with enable_gqa and SDPA over K/V expanded to all query heads (expansion not timed)."""
    times = {}
    try:
        times["gqa"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
    except RuntimeError as e:  # a backend without GQA support
        print(f"  sdpa enable_gqa failed: {e}")
    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    times["expanded"] = bench_ms(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=causal))
    if causal:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        times["flash"] = bench_ms(flash)
    return min(times.values()), times


def fp32_reference(q, k, v, causal):
    """SDPA in fp32 over the dense K/V, expanded to all query heads: the check each configuration must pass."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                          v.float().repeat_interleave(group, 1), is_causal=causal)


def max_err(out, ref):
    return (out.float() - ref.float()).abs().max().item()


def tune_decode(dtype, quick, copy_gbps):
    if quick:
        space = [DecodeConfig(bn, w, s, p) for bn, w, s, p in itertools.product([64, 128], [4, 8], [2, 3], [None])]
    else:
        space = [DecodeConfig(bn, w, s, p) for bn, w, s, p in
                 itertools.product([32, 64, 128], [4, 8], [2, 3, 4], [None, 256, 512, 1024, 2048])]
    rows, best = [], {}
    for batch, ctx in DECODE_CASES:
        name = f"decode b{batch} ctx{ctx}"
        args = make_inputs([1] * batch, [ctx] * batch, dtype)
        kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * args[1].element_size()
        k, v = dense_kv(args)
        q = args[0].view(batch, NUM_HEADS, 1, HEAD_DIM)
        base_ms, base = sdpa_ms(q, k, v, causal=False)
        ref = fp32_reference(q, k, v, causal=False).view(batch, NUM_HEADS, HEAD_DIM)
        del k, v
        rows.append(dict(case=name, config="sdpa " + min(base, key=base.get), ms=base_ms,
                         gbps=kv_bytes / base_ms / 1e6, pct_copy=kv_bytes / base_ms / 1e6 / copy_gbps))
        case_rows = []
        for cfg in space:
            try:
                out = paged_attention_triton(*args, decode_config=cfg)
                err = max_err(out, ref)
                ms = bench_ms(lambda: paged_attention_triton(*args, decode_config=cfg))
            except Exception as e:  # out of resources etc.: report, keep sweeping
                rows.append(dict(case=name, config=str(cfg), error=type(e).__name__))
                continue
            gbps = kv_bytes / ms / 1e6
            row = dict(case=name, config=str(cfg), ms=ms, gbps=gbps, pct_copy=gbps / copy_gbps, vs_sdpa=base_ms / ms,
                       max_err=err, ok=err < 3e-2)
            case_rows.append(row)
        ok = [r for r in case_rows if r["ok"]]
        if ok:
            best[name] = min(ok, key=lambda r: r["ms"])
        rows += sorted(case_rows, key=lambda r: r["ms"])
        del args, ref
        torch.cuda.empty_cache()
    return rows, best


def tune_prefill(dtype, quick):
    if quick:
        space = [PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 64, 4, 3), PrefillConfig(128, 128, 8, 3),
                 PrefillConfig(64, 64, 4, 3), PrefillConfig(128, 32, 4, 3), PrefillConfig(128, 64, 8, 2)]
    else:
        space = [PrefillConfig(m, n, w, s) for m, n, w, s in
                 itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])]
    batch, seqlen = PREFILL_CASE
    name = f"prefill {batch}x{seqlen} causal"
    args = make_inputs([seqlen] * batch, [seqlen] * batch, dtype)
    flops = 4 * batch * NUM_HEADS * HEAD_DIM * seqlen * (seqlen + 1) / 2
    k, v = dense_kv(args)
    q = args[0].view(batch, seqlen, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    base_ms, base = sdpa_ms(q, k, v, causal=True)
    ref = fp32_reference(q, k, v, causal=True).transpose(1, 2).reshape(batch * seqlen, NUM_HEADS, HEAD_DIM)
    del k, v
    # Every SDPA backend is a row; the 'vs_sdpa' ratios use the flash backend (FlashAttention-2), the target's baseline.
    rows = [dict(case=name, config=f"sdpa {kind}", ms=ms, tflops=flops / ms / 1e9) for kind, ms in base.items()]
    base_ms = base["flash"]
    case_rows = []
    for cfg in space:
        try:
            out = paged_attention_triton(*args, prefill_config=cfg)
            err = max_err(out, ref)
            ms = bench_ms(lambda: paged_attention_triton(*args, prefill_config=cfg))
        except Exception as e:
            rows.append(dict(case=name, config=str(cfg), error=type(e).__name__))
            continue
        case_rows.append(dict(case=name, config=str(cfg), ms=ms, tflops=flops / ms / 1e9, vs_sdpa=base_ms / ms,
                              max_err=err, ok=err < 3e-2))
    ok = [r for r in case_rows if r["ok"]]
    best = {name: min(ok, key=lambda r: r["ms"])} if ok else {}
    return rows + sorted(case_rows, key=lambda r: r["ms"]), best


# ---- decode sweep: the split-KV kernel's knobs and structural variants ---------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWEEP_TOL = 3e-2  # max |error| against the fp32 reference (bf16/fp16 outputs)
TIMING = dict(warmup_ms=25, rep_ms=100)  # stages 1 and 2: a median over some hundreds of graph replays
FINAL_TIMING = dict(warmup_ms=25, rep_ms=200)
FINAL_ROUNDS = 3
STAGE2_MAX = 24


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """One decode step: ``batch`` sequences of ``ctx`` cached tokens, one query token each, over block tables
    ``width`` keys wide (0: as wide as the context; the runtime's tables are max_model_len wide)."""
    batch: int
    ctx: int
    num_heads: int = NUM_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    head_dim: int = HEAD_DIM
    block_size: int = BLOCK_SIZE
    width: int = 0

    @property
    def name(self) -> str:
        return f"b{self.batch} ctx{self.ctx}" + (f" w{self.width}" if self.width > self.ctx else "")

    def kv_bytes(self, dtype: torch.dtype) -> int:
        return 2 * self.batch * self.ctx * self.num_kv_heads * self.head_dim * (torch.finfo(dtype).bits // 8)


SWEEP_SHAPES = [DecodeShape(batch, ctx) for batch, ctx in DECODE_CASES]
SMOKE_SHAPES = [DecodeShape(2, 96, 4, 2, 32), DecodeShape(1, 200, 4, 2, 32), DecodeShape(4, 40, 4, 2, 32)]
# Labels name a config's departures from this tiling and DecodeConfig's field defaults.
LABEL_BASE = DecodeConfig(block_n=128, num_warps=4, num_stages=2)
KNOB_GROUPS = {  # stage 2 transplants each group as a unit
    "split sizing": ("partition_size", "programs_per_sm", "min_partition", "max_splits"),
    "grid order": ("grid_order",),
    "merge": ("merge", "direct_single_split"),
}
_SHORT = dict(partition_size="part", programs_per_sm="pps", min_partition="minp", max_splits="maxs",
              grid_order="order", merge="merge", direct_single_split="direct", fit_splits="fit",
              short_partition="short", wave_block_n="wave", wave_num_warps="wwarps", resident="res",
              wave_resident="wres")


def label(cfg: DecodeConfig) -> str:
    parts = [f"bn{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"]
    if cfg.kv_gather != LABEL_BASE.kv_gather:
        parts.append(cfg.kv_gather)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _SHORT and value != getattr(LABEL_BASE, f.name):
            parts.append(_SHORT[f.name] if value is True else f"{_SHORT[f.name]}={value}")
    return " ".join(parts)


def decode_sweep_candidates() -> list[DecodeConfig]:
    """Stage 1: 41 configs, not a grid. Chosen from each one's sm_90 compile with triton 3.6 (shared memory,
    registers and pipeline schedule, read off the compiled kernels), not from timings:
    - Pipeline depth: 2 stages and deeper ones (the pipeliner gives the block-table -> K/V load chain
      (num_stages - 1) // 2 buffers: 5 stages double-buffer, 7 triple-buffer). Programs per SM (shared memory /
      registers): bn128 s2 3, bn128 s5 1, bn64 s5 3, bn64 s7 2, bn32 s5 5, bn32 s7 4, bn16 s7 5-7. On an H100
      the sweep found 2 stages as fast as 5-7.
    - kv_gather "key" and "page" on every tiling ("page": one block-table load per page; bn128 s2 needs 128
      registers instead of 162).
    - Split sizing, grid order and merges, each on the default tiling and on a double-buffered one.
    """
    def cfg(block_n=128, num_warps=4, num_stages=2, **variant):
        return DecodeConfig(block_n, num_warps, num_stages, **variant)

    out = [DECODE_CONFIGS[128]]
    for tiling in [(128, 4, 2), (64, 4, 2), (128, 4, 5), (128, 8, 5), (64, 4, 5), (64, 4, 7), (64, 8, 5),
                   (32, 4, 5), (32, 4, 7), (16, 4, 7)]:
        out += [cfg(*tiling, kv_gather=gather) for gather in ("key", "page")]
    references = [cfg(), cfg(64, 4, 5, kv_gather="page")]
    for ref in references:
        out += [dataclasses.replace(ref, programs_per_sm=pps) for pps in (2, 4, 8, 32)]
        out.append(dataclasses.replace(ref, programs_per_sm=32, min_partition=256))
        out += [dataclasses.replace(ref, grid_order=order) for order in ("head", "split")]
    out += [dataclasses.replace(references[1], merge=merge, grid_order=order)
            for merge in ("group", "fused") for order in ("token", "split")]
    out += [dataclasses.replace(references[0], merge="fused"), dataclasses.replace(references[0], direct_single_split=True)]
    return list(dict.fromkeys(out))  # drop repeats, keep the order


def split_candidates() -> list[DecodeConfig]:
    """How many programs a decode step should have: the default tiling with fixed partitions from 512 keys to
    32768 (one split at every issue shape), with partitions from the table width alone (no fit_splits), and with
    other least partitions."""
    base = DECODE_CONFIGS[128]
    out = [base] + [dataclasses.replace(base, partition_size=p) for p in (512, 1024, 2048, 4096, 8192, 16384, 32768)]
    out.append(dataclasses.replace(base, fit_splits=False))  # partitions from the table width alone
    # Splits of 512 keys at least whatever the batch (the rule before run BE), and of 128 whatever the batch.
    out += [dataclasses.replace(base, short_partition=512), dataclasses.replace(base, min_partition=128)]
    return list(dict.fromkeys(out))


def occupancy_candidates() -> list[DecodeConfig]:
    """More resident programs per SM: tilings whose sm_90 compile (triton 3.6) fits 4-5 programs per SM (bn64 w4
    s2: 96 registers, 38,912 B of shared memory; bn32 w4 s2: 96 and 21,504 B; bn32 w4 s3: 114 registers), against
    the default's 3, at split-sizing targets of 2-5 programs per SM, and at one split whatever the shape; and the
    default without its wave tiling (DecodeConfig.wave_block_n)."""
    base = DECODE_CONFIGS[128]
    out = [base, dataclasses.replace(base, wave_block_n=0), dataclasses.replace(base, programs_per_sm=3)]
    for block_n, stages in ((64, 2), (32, 2), (32, 3)):
        tiled = dataclasses.replace(base, block_n=block_n, num_stages=stages, wave_block_n=0)
        out += [dataclasses.replace(tiled, programs_per_sm=pps) for pps in (2, 3, 4, 5)]
        out.append(dataclasses.replace(tiled, partition_size=32768))
    return list(dict.fromkeys(out))


def wave_candidates(base: DecodeConfig) -> list[DecodeConfig]:
    """The wave tiling of one head_dim row (DecodeConfig: steps of more (token, kv head) pairs than the row's
    tiling keeps resident run another tiling at one split): the row as it is, without its wave tiling, and with
    other wave tilings (keys per step, warps), unbounded above, and bn32 w2 from later band starts. Stages are the
    row's; the kernel_resources lines tell the programs per SM each tiling really keeps."""
    out = [base, dataclasses.replace(base, wave_block_n=0)]
    for block_n, warps in ((64, 4), (64, 2), (32, 2), (32, 4), (16, 1), (32, 1)):
        out.append(dataclasses.replace(base, wave_block_n=block_n, wave_num_warps=warps, wave_resident=0))
    # the band starting later: where a smaller head_dim lets the row's own tiling keep more programs resident
    out += [dataclasses.replace(base, wave_block_n=32, wave_num_warps=2, wave_resident=0, resident=resident)
            for resident in (5, 8)]
    return list(dict.fromkeys(out))


LAYOUTS = ("runtime", "random")


def decode_inputs(shape: DecodeShape, dtype: torch.dtype, device: str, seed: int = 0, num_blocks: int | None = None,
                  layout: str = "random"):
    """paged_attention arguments for one decode step. num_blocks=None: the caches hold exactly the needed blocks,
    laid out as ``layout`` says: "runtime", where the runtime's block manager puts them for a batch admitted and
    decoded together (common.runtime_block_tables, bench_ops' primary decode row), or "random", a random
    permutation (1-2.5% slower on an H100, RESULTS.md run CJ). An int: a cache of that many blocks that every table
    entry points into (same shapes, strides and kernel specialisations, for compiling)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = math.ceil(shape.ctx / shape.block_size)
    if num_blocks is None:
        num_blocks = shape.batch * blocks_per_seq
        if layout == "runtime":
            block_tables = runtime_block_tables(shape.batch, shape.ctx, shape.block_size, device=device)
        else:
            physical = torch.randperm(num_blocks, device=device, generator=gen)
            block_tables = physical.view(shape.batch, blocks_per_seq).to(torch.int32)
    else:
        block_tables = torch.randint(num_blocks, (shape.batch, blocks_per_seq), device=device, generator=gen,
                                     dtype=torch.int32)
    table_blocks = math.ceil(shape.width / shape.block_size)
    if table_blocks > blocks_per_seq:  # entries past each context: never read
        unused = torch.zeros((shape.batch, table_blocks - blocks_per_seq), dtype=torch.int32, device=device)
        block_tables = torch.cat([block_tables, unused], dim=1)
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device, generator=gen)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device, generator=gen)
    query = torch.randn((shape.batch, shape.num_heads, shape.head_dim), dtype=dtype, device=device, generator=gen)
    seq_lens = torch.full((shape.batch,), shape.ctx, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(shape.batch + 1, dtype=torch.int32, device=device)
    return query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, shape.head_dim ** -0.5


def _is_cuda_error(e: Exception) -> bool:
    """An error after which this process's CUDA context is unusable (an illegal address, a launch failure)."""
    text = f"{type(e).__name__}: {e}"
    return "AcceleratorError" in text or "CUDA error" in text or "illegal" in text


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _compile_worker(job):
    """Runs every candidate once per shape on small caches with the real shapes' kernel specialisations, which
    leaves the compiled kernels in Triton's on-disk cache for the timing process. Returns {index: None or the
    error}; stops at the first CUDA error (the context is gone), leaving the rest unreported."""
    indices, configs, shapes, dtype_name = job
    dtype = getattr(torch, dtype_name)
    inputs = [decode_inputs(DecodeShape(*shape), dtype, DEVICE, num_blocks=64) for shape in shapes]
    errors = {}
    for index, cfg in zip(indices, configs):
        try:
            for args in inputs:
                paged_attention_triton(*args, decode_config=cfg)
            _sync()
            errors[index] = None
        except Exception as e:  # report, keep compiling the others
            errors[index] = f"{type(e).__name__}: {e}"[:300]
            if _is_cuda_error(e):
                break
    return errors


def precompile(pool, configs, shapes, dtype_name, jobs):
    """Submits configs to the workers, interleaved so that each gets a mix; returns futures of {index: error}."""
    if pool is None:
        return []
    shape_tuples = [dataclasses.astuple(s) for s in shapes]
    return [pool.submit(_compile_worker, (list(range(w, len(configs), jobs)), configs[w::jobs], shape_tuples, dtype_name))
            for w in range(jobs)]


def collect(futures, configs) -> dict:
    """{label: error} of the configs a worker failed; configs a worker never reached are simply compiled later."""
    failed = {}
    for future in futures:
        try:
            for index, error in future.result().items():
                if error is not None:
                    failed[label(configs[index])] = error
        except Exception as e:  # a worker that died: its configs compile in the timing process
            print(f"  compile worker failed: {type(e).__name__}: {e}")
    return failed


class ShapeBench:
    """Inputs, fp32 reference and SDPA baseline of one shape; times candidates against them."""

    def __init__(self, shape: DecodeShape, dtype: torch.dtype, layout: str = "random"):
        self.shape = shape
        self.copy_gbps = None  # set before timing
        self.kv_bytes = shape.kv_bytes(dtype)
        self.args = decode_inputs(shape, dtype, DEVICE, layout=layout)
        k, v = dense_kv(self.args)
        batch, heads, head_dim = shape.batch, shape.num_heads, shape.head_dim
        q = self.args[0].view(batch, heads, 1, head_dim)
        self.ref = fp32_reference(q, k, v, causal=False).view(batch, heads, head_dim)
        q_grouped = self.args[0].view(batch, shape.num_kv_heads, heads // shape.num_kv_heads, head_dim)
        self.sdpa = {
            "sdpa enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "sdpa grouped": lambda: F.scaled_dot_product_attention(q_grouped, k, v),  # one query per kv head row
        }
        self.sdpa_ms = None  # enable_gqa, the baseline of every ratio

    def rates(self, ms: float) -> dict:
        gbps = self.kv_bytes / ms / 1e6
        return dict(ms=ms, gbps=gbps, pct_copy=gbps / self.copy_gbps,
                    vs_sdpa=self.sdpa_ms / ms if self.sdpa_ms else None)

    def time_sdpa(self, timing) -> list[dict]:
        rows = []
        for name, fn in self.sdpa.items():
            try:
                ms = bench_ms(fn, cuda_graph=True, **timing)
            except Exception as e:  # a backend without GQA support, say
                rows.append(dict(shape=self.shape.name, config=name, error=f"{type(e).__name__}: {e}"[:200]))
                continue
            if name == "sdpa enable_gqa":
                self.sdpa_ms = ms
            rows.append(dict(shape=self.shape.name, config=name, **self.rates(ms)))
        return rows

    def time_config(self, cfg: DecodeConfig, timing) -> dict:
        row = dict(shape=self.shape.name, config=label(cfg), params=dataclasses.asdict(cfg))
        fn = functools.partial(paged_attention_triton, *self.args, decode_config=cfg)
        t0 = time.perf_counter()
        out = fn()  # compiles here if no worker did
        _sync()
        row["first_call_s"] = time.perf_counter() - t0
        row["max_err"] = max_err(out, self.ref)
        row["ok"] = row["max_err"] < SWEEP_TOL
        if row["ok"]:
            row.update(self.rates(bench_ms(fn, cuda_graph=True, **timing)))
        return row


class SweepAborted(Exception):
    pass


def run_stage(stage, configs, benches, compile_failed, timing, rows: list[dict]) -> None:
    """Checks and times every config at every shape, appending to rows (kept if a CUDA error aborts the sweep)."""
    for cfg in configs:
        for bench in benches:
            name = label(cfg)
            if name in compile_failed:
                rows.append(dict(stage=stage, shape=bench.shape.name, config=name, params=dataclasses.asdict(cfg),
                                 error="compile worker: " + compile_failed[name]))
                continue
            try:
                row = bench.time_config(cfg, timing)
            except Exception as e:
                row = dict(shape=bench.shape.name, config=name, params=dataclasses.asdict(cfg),
                           error=f"{type(e).__name__}: {e}"[:300])
                if _is_cuda_error(e):  # every later launch in this process would fail too
                    rows.append(dict(stage=stage, **row))
                    raise SweepAborted(row["error"]) from e
            rows.append(dict(stage=stage, **row))


def _timed(rows):
    return [r for r in rows if r.get("ok") and "ms" in r]


def stage2_candidates(rows, measured: set, base: DecodeConfig) -> list[DecodeConfig]:
    """Per shape: knob groups (split sizing, grid order, merge) whose best setting beat, by > 0.5%, the same
    tiling with base's knobs; applied, all together and one by one, to that shape's three fastest tilings."""
    default_knobs = {f: getattr(base, f) for fields in KNOB_GROUPS.values() for f in fields}
    per_shape = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        out = []
        per_shape.append(out)
        timed = {r["config"]: r for r in _timed(rows) if r["shape"] == shape}
        configs = {r["config"]: DecodeConfig(**r["params"]) for r in timed.values()}

        def knobs_default(cfg, groups=KNOB_GROUPS):
            return all(getattr(cfg, f) == default_knobs[f] for g in groups for f in KNOB_GROUPS[g])

        tilings = sorted((c for c in configs.values() if knobs_default(c)), key=lambda c: timed[label(c)]["ms"])[:3]
        winners = {}
        for group, fields in KNOB_GROUPS.items():
            best_gain, best_values = 1.005, None
            for name, cfg in configs.items():
                others = [g for g in KNOB_GROUPS if g != group]
                if knobs_default(cfg, [group]) or not knobs_default(cfg, others):
                    continue
                reference = label(dataclasses.replace(cfg, **{f: default_knobs[f] for f in fields}))
                if reference in timed and timed[reference]["ms"] / timed[name]["ms"] > best_gain:
                    best_gain = timed[reference]["ms"] / timed[name]["ms"]
                    best_values = {f: getattr(cfg, f) for f in fields}
            if best_values is not None:
                winners[group] = best_values
        if not winners:
            continue
        changes = [dict(kv for values in winners.values() for kv in values.items())]
        if len(winners) > 1:
            changes += list(winners.values())
        for tiling in tilings:
            out += [dataclasses.replace(tiling, **change) for change in changes]
    interleaved = [c for round_ in itertools.zip_longest(*per_shape) for c in round_ if c is not None]
    return [c for c in dict.fromkeys(interleaved) if label(c) not in measured][:STAGE2_MAX]


def best_single(rows, shape_names):
    """The config with the highest worst-case ratio to SDPA over every shape (ties: the geometric mean)."""
    by_config = {}
    for r in _timed(rows):
        if not r["config"].startswith("sdpa"):
            by_config.setdefault(r["config"], {})[r["shape"]] = r
    scored = []
    for name, per_shape in by_config.items():
        if set(per_shape) == set(shape_names) and all(r.get("vs_sdpa") for r in per_shape.values()):
            ratios = [per_shape[s]["vs_sdpa"] for s in shape_names]
            scored.append((min(ratios), statistics.geometric_mean(ratios), name, per_shape))
    return max(scored, key=lambda t: t[:2]) if scored else None


def final_retime(benches, rows, single_name, default_name, configs_by_label) -> list[dict]:
    """The 3 fastest per shape, the best single config and the default, FINAL_ROUNDS rounds interleaved with SDPA;
    each row keeps the median over rounds."""
    out = []
    for bench in benches:
        timed = sorted((r for r in _timed(rows) if r["shape"] == bench.shape.name), key=lambda r: r["ms"])
        names = list(dict.fromkeys([r["config"] for r in timed[:3]] + [single_name, default_name]))
        names = [n for n in names if n in configs_by_label]
        samples = {n: [] for n in ["sdpa enable_gqa"] + names}
        for _ in range(FINAL_ROUNDS):
            samples["sdpa enable_gqa"].append(bench_ms(bench.sdpa["sdpa enable_gqa"], cuda_graph=True, **FINAL_TIMING))
            for n in names:
                fn = functools.partial(paged_attention_triton, *bench.args, decode_config=configs_by_label[n])
                samples[n].append(bench_ms(fn, cuda_graph=True, **FINAL_TIMING))
        bench.sdpa_ms = statistics.median(samples["sdpa enable_gqa"])
        for n, times in samples.items():
            tags = [t for t, hit in (("default", n == default_name), ("best single", n == single_name)) if hit]
            out.append(dict(stage="final", shape=bench.shape.name, config=n, note=", ".join(tags), ok=True,
                            spread=(max(times) - min(times)) / min(times), **bench.rates(statistics.median(times))))
    return out


def print_shape_tables(rows, title, top=8):
    print(f"\n== {title}")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        shown = sorted(_timed(mine), key=lambda r: r["ms"])[:top]
        shown += [r for r in mine if not (r.get("ok") and "ms" in r)]  # failures and wrong results, always
        ours = [r for r in mine if not r["config"].startswith("sdpa")]
        print(f"-- {shape}: {len(_timed(ours))} of {len(ours)} configs timed")
        print_table(shown, ["config", "ms", "pct_copy", "vs_sdpa", "max_err", "first_call_s", "error"])


def decode_sweep(opts):
    started = time.perf_counter()
    dtype = getattr(torch, opts.dtype)
    shapes = SMOKE_SHAPES if opts.smoke else SWEEP_SHAPES
    if opts.shapes:
        shapes = []
        for item in opts.shapes.lower().split(","):
            batch, rest = item.lstrip("b").split("x")
            rest, _, head_dim = rest.partition("d")
            ctx, _, width = rest.partition("w")
            shapes.append(DecodeShape(int(batch), int(ctx), head_dim=int(head_dim or HEAD_DIM), width=int(width or 0)))
    jobs = opts.jobs if opts.jobs is not None else (min(8, max(1, (os.cpu_count() or 2) - 2)) if DEVICE == "cuda" else 0)
    d_pads = {max(1 << (s.head_dim - 1).bit_length(), 16) for s in shapes}
    if opts.candidates == "wave":
        if len(d_pads) > 1:
            raise SystemExit("--candidates wave tunes one head_dim row: give shapes of one head_dim")
        candidates = wave_candidates(default_decode_config(d_pads.pop(), dtype))
    else:
        candidates = dict(all=decode_sweep_candidates, splits=split_candidates,
                          occupancy=occupancy_candidates)[opts.candidates]()
    if opts.limit:
        candidates = candidates[:opts.limit]
    if opts.smoke:  # partitions scaled to the tiny contexts, so that splits and their merges run too
        candidates = list(dict.fromkeys(dataclasses.replace(c, min_partition=min(c.min_partition, 32)) for c in candidates))
    info = device_info()
    result = dict(device=info, dtype=opts.dtype, layout=opts.layout,
                  shapes=[dataclasses.asdict(s) for s in shapes],
                  tolerance=SWEEP_TOL, timing=TIMING, final_timing=FINAL_TIMING, rows=[], stage_s={})
    path = os.path.join(opts.out, "tune_decode_sweep.json")

    def save(**updates):
        result.update(updates, elapsed_s=time.perf_counter() - started)
        write_json(path, result)

    pool = None
    if jobs:
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    rows = []
    try:
        t0 = time.perf_counter()
        futures = precompile(pool, candidates, shapes, opts.dtype, jobs)
        benches = [ShapeBench(shape, dtype, opts.layout) for shape in shapes]  # while the workers compile
        result["inputs_s"] = time.perf_counter() - t0
        compile_failed = collect(futures, candidates)
        result["stage_s"]["compile 1"] = time.perf_counter() - t0
        # Measured once the workers are done: they launch kernels too.
        copy_gbps = copy_bandwidth_gbps() if DEVICE == "cuda" else copy_bandwidth_gbps(32 << 20)
        for bench in benches:
            bench.copy_gbps = copy_gbps
        print(f"{info.get('device')}  torch {info['torch']}  triton {info['triton']}  copy {copy_gbps:.0f} GB/s  "
              f"{len(candidates)} candidates x {len(shapes)} shapes, {jobs} compile workers "
              f"({result['stage_s']['compile 1']:.0f} s to compile)")
        save(copy_gbps=copy_gbps)

        t0 = time.perf_counter()
        rows += [dict(stage="sdpa", **r) for b in benches for r in b.time_sdpa(TIMING)]
        run_stage("1", candidates, benches, compile_failed, TIMING, rows)
        result["stage_s"]["time 1"] = time.perf_counter() - t0
        save(rows=rows)
        print_shape_tables(rows, "stage 1 (fastest first)")

        measured = {r["config"] for r in rows}
        configs_by_label = {label(c): c for c in candidates}
        if time.perf_counter() - started < opts.budget_s:
            stage2 = stage2_candidates(rows, measured, base=candidates[0])
            print(f"\nstage 2: {len(stage2)} combinations")
            if stage2:
                t0 = time.perf_counter()
                compile_failed.update(collect(precompile(pool, stage2, shapes, opts.dtype, jobs), stage2))
                run_stage("2", stage2, benches, compile_failed, TIMING, rows)
                configs_by_label.update({label(c): c for c in stage2})
                result["stage_s"]["stage 2"] = time.perf_counter() - t0
                save(rows=rows)
                print_shape_tables([r for r in rows if r.get("stage") == "2"], "stage 2 (fastest first)")
        else:
            print(f"\nstage 2 skipped: past the {opts.budget_s:.0f} s budget")

        shape_names = [s.name for s in shapes]
        single = best_single(rows, shape_names)
        final = []
        if time.perf_counter() - started < opts.budget_s:
            t0 = time.perf_counter()
            final = final_retime(benches, rows, single[2] if single else None, label(candidates[0]), configs_by_label)
            result["stage_s"]["final"] = time.perf_counter() - t0
            rows += final
            single = best_single(final, shape_names) or single  # ranked again on the longer runs
            print(f"\n== final re-timing: median of {FINAL_ROUNDS} rounds interleaved with SDPA (spread: max/min - 1)")
            print_table(final, ["shape", "config", "ms", "pct_copy", "vs_sdpa", "spread", "note"])
        summary(rows, final, single, shape_names, label(candidates[0]), configs_by_label, result)
        result["kernels"] = kernel_resources()
        print("\n== compiled decode kernels (_decode_kernel)")
        for k in result["kernels"]:
            print("  " + " ".join(f"{key}={value}" for key, value in k.items()))
        save(rows=rows)
    except SweepAborted as e:
        print(f"\nsweep aborted after a CUDA error (the context is lost): {e}")
        save(rows=rows, aborted=str(e))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")


def kernel_resources() -> list[dict]:
    """Registers, spills, shared memory and the resident programs per SM that follow from them, of every
    _decode_kernel variant this process compiled (read off Triton's in-memory caches; empty where it keeps them
    elsewhere)."""
    import importlib

    import triton
    pa = importlib.import_module("cinfer_ops.paged_attention")  # the module, not the op of the same name
    props = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else None
    out = []
    for caches in getattr(pa._decode_kernel, "device_caches", {}).values():
        for kernel in caches[0].values():
            try:
                kernel._init_handles()
                meta = kernel.metadata
                warps, shared, regs = meta.num_warps, meta.shared, kernel.n_regs
                row = dict(regs=regs, spills=kernel.n_spills, shared=shared, warps=warps, stages=meta.num_stages)
                if props is not None:
                    by_regs = props.regs_per_multiprocessor // max(1, triton.cdiv(regs * 32, 256) * 256 * warps)
                    by_shared = props.shared_memory_per_multiprocessor // (shared + 1024)
                    by_warps = props.max_threads_per_multi_processor // (32 * warps)
                    row["programs_per_sm"] = min(by_regs, by_shared, by_warps, 32)
                out.append(row)
            except Exception as e:  # diagnostics only
                out.append(dict(error=f"{type(e).__name__}: {e}"[:200]))
    return out


def summary(rows, final, single, shape_names, default_name, configs_by_label, result):
    """Prints the per-shape verdict and the best single config (pasteable), and stores them in result."""
    source = final or _timed(rows)
    print(f"\n== summary ({'final re-timing, median of ' + str(FINAL_ROUNDS) + ' rounds' if final else 'stage timings'})")
    best = {}
    table = []
    for shape in shape_names:
        mine = [r for r in source if r["shape"] == shape and "ms" in r]
        sdpa = next((r for r in mine if r["config"] == "sdpa enable_gqa"), None) or next(
            (r for r in rows if r["shape"] == shape and r["config"] == "sdpa enable_gqa" and "ms" in r), None)
        ours = sorted((r for r in mine if not r["config"].startswith("sdpa")), key=lambda r: r["ms"])
        default = next((r for r in mine if r["config"] == default_name), None)
        if not ours:
            continue
        best[shape] = ours[0]
        table.append(dict(shape=shape, sdpa_ms=sdpa and sdpa["ms"], sdpa_pct_copy=sdpa and sdpa["pct_copy"],
                          default_ms=default and default["ms"], default_vs_sdpa=default and default.get("vs_sdpa"),
                          best_ms=ours[0]["ms"], best_vs_sdpa=ours[0].get("vs_sdpa"), best_pct_copy=ours[0]["pct_copy"],
                          best_config=ours[0]["config"]))
    print_table(table, ["shape", "sdpa_ms", "sdpa_pct_copy", "default_ms", "default_vs_sdpa", "best_ms", "best_vs_sdpa",
                        "best_pct_copy", "best_config"])
    result["best_per_shape"] = {s: dict(row, decode_config=repr(configs_by_label.get(row["config"])))
                                for s, row in best.items()}
    for shape, row in best.items():
        print(f"  {shape}: {configs_by_label.get(row['config'])!r}")
    if single:
        worst, geomean, name, per_shape = single
        print(f"best single config over all shapes (worst x{worst:.3f} vs sdpa, geomean x{geomean:.3f}): {name}\n"
              f"  {configs_by_label.get(name)!r}\n  "
              + "  ".join(f"{s} x{per_shape[s]['vs_sdpa']:.3f} ({per_shape[s]['pct_copy']:.0%} copy)" for s in shape_names))
        result["best_single"] = dict(config=name, decode_config=repr(configs_by_label.get(name)), worst_vs_sdpa=worst,
                                     geomean_vs_sdpa=geomean, per_shape={s: per_shape[s] for s in shape_names})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for tune_paged_attention.json")
    parser.add_argument("--quick", action="store_true", help="a handful of configurations per case")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--only", choices=["decode", "prefill"], help="run one half of the sweep")
    parser.add_argument("--decode-sweep", action="store_true", help="the split-KV kernel's knobs and variants")
    parser.add_argument("--smoke", action="store_true", help="decode sweep at tiny shapes (runs on CPU)")
    parser.add_argument("--jobs", type=int, help="decode sweep compile workers (default: 8 on a GPU, 0 on CPU)")
    parser.add_argument("--candidates", choices=["all", "splits", "occupancy", "wave"], default="all",
                        help="decode sweep: the full stage-1 list, the default tiling at fixed split sizes, "
                             "tilings with more resident programs per SM, or the wave tiling of the shapes' "
                             "head_dim row")
    parser.add_argument("--shapes", help="decode sweep: other shapes than the issue's, as "
                                         "BATCHxCONTEXT[wWIDTH][dHEAD_DIM],... (e.g. b4x32768,b8x1000w8192,"
                                         "b64x384w8192d64: WIDTH keys of block table, head_dim HEAD_DIM, not 128)")
    parser.add_argument("--layout", choices=LAYOUTS, default="runtime",
                        help="decode sweep: each sequence's blocks where the runtime's block manager puts them "
                             "(bench_ops' primary row), or in a random permutation (the sweeps of sessions 1-10)")
    parser.add_argument("--limit", type=int, help="decode sweep: only the first N stage-1 candidates")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="decode sweep: skip stage 2 / the final re-timing once this many seconds have passed")
    opts = parser.parse_args()
    if opts.decode_sweep:
        decode_sweep(opts)
        return
    assert torch.cuda.is_available(), "this script tunes the GPU kernels"
    dtype = getattr(torch, opts.dtype)
    info = device_info()
    copy_gbps = copy_bandwidth_gbps()
    print(f"{info.get('device')}  torch {info['torch']}  triton {info['triton']}  copy {copy_gbps:.0f} GB/s")
    result = dict(device=info, copy_gbps=copy_gbps, dtype=opts.dtype, rows=[], best={})
    if opts.only in (None, "decode"):
        rows, best = tune_decode(dtype, opts.quick, copy_gbps)
        print_table(rows, ["case", "config", "ms", "gbps", "pct_copy", "vs_sdpa", "max_err", "ok", "error"])
        result["rows"] += rows
        result["best"].update(best)
    if opts.only in (None, "prefill"):
        rows, best = tune_prefill(dtype, opts.quick)
        print_table(rows, ["case", "config", "ms", "tflops", "vs_sdpa", "max_err", "ok", "error"])
        result["rows"] += rows
        result["best"].update(best)
    print("\nbest per case:")
    for name, row in result["best"].items():
        print(f"  {name}: {row['config']}  {row['ms']:.3f} ms  x{row['vs_sdpa']:.2f} vs sdpa"
              + (f"  {row['pct_copy']:.0%} of copy bandwidth" if "pct_copy" in row else f"  {row['tflops']:.0f} TFLOP/s"))
    write_json(os.path.join(opts.out, "tune_paged_attention.json"), result)


if __name__ == "__main__":
    main()
