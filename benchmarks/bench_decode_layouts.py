"""Decode attention over the block tables of a serving run, against the same contexts with each sequence's blocks
consecutive (how a fresh cache lays out a batch's prompts) and with every block at random in the cache.

    PYTHONPATH=. python -m benchmarks.bench_decode_layouts --out benchmarks/out   # GPU, Llama-3-8B attention
    PYTHONPATH=. python -m benchmarks.bench_decode_layouts --smoke                 # CPU, tiny shapes (interpreter)

The steps come from ``block_layout.serving_steps``: bench_serving's workload through the real scheduler and block
manager. The script picks the decode steps of at least --min-batch requests at the 10th, 50th and 90th percentile of
``block_layout.regions_per_block`` (most local first), and times ``cinfer::paged_attention`` over each step's own
tables, contexts and cache size in the three layouts (CUDA-graph replays after an L2 flush, interleaved rounds,
median). Every output is first checked against the op's float32 reference. The ratio to the consecutive layout is what
the serving layout costs; bench_ops times the same kernel against SDPA.
"""
import argparse
import math
import os
import random
import statistics
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before cinfer_ops is imported: the kernels run in the interpreter

from benchmarks.block_layout import random_like, regions_per_block, serving_steps  # noqa: E402
from benchmarks.common import (bench_rounds_ms, capture, copy_bandwidth_gbps, device_info,  # noqa: E402
                               print_table, write_json)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16
ROUNDS = 3


def consecutive_tables(contexts: list[int]) -> list[list[int]]:
    """Each sequence's blocks consecutive, the sequences back to back from block 0."""
    tables, next_block = [], 0
    for ctx in contexts:
        n = -(-ctx // BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    return tables


def as_tensor(tables: list[list[int]]) -> torch.Tensor:
    width = max(map(len, tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)


def pick_steps(steps, min_batch: int) -> list[tuple[str, list[list[int]], list[int]]]:
    """The steps of at least min_batch requests at the 10th / 50th / 90th percentile of locality."""
    scored = sorted((regions_per_block(t, 64), t, c) for t, c in steps if len(t) >= min_batch)
    if not scored:
        raise SystemExit(f"no decode step of {min_batch} requests or more: lower --min-batch")
    return [(f"p{q}", scored[min(len(scored) - 1, q * len(scored) // 100)]) for q in (10, 50, 90)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for bench_decode_layouts.json")
    ap.add_argument("--smoke", action="store_true", help="tiny workload and heads (CPU)")
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--min-batch", type=int, default=64)
    args = ap.parse_args(argv)
    import cinfer_ops  # noqa: F401  (registers torch.ops.cinfer.*)
    from cinfer_ops.paged_attention import paged_attention_reference

    if args.smoke:
        heads, kv_heads, head_dim = 4, 2, 32
        steps, num_blocks, _ = serving_steps(24, 8, (20, 60), (5, 30), every=2, with_contexts=True)
        min_batch = 2
    else:
        heads, kv_heads, head_dim = 32, 8, 128
        steps, num_blocks, _ = serving_steps(args.num_requests, args.max_num_seqs, (64, 1024), (64, 512), every=10,
                                             with_contexts=True)
        min_batch = args.min_batch
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)  # queries
    rng = random.Random(0)  # random layouts
    cache_gen = torch.Generator(device=DEVICE).manual_seed(1)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=cache_gen, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(shape, generator=cache_gen, device=DEVICE, dtype=dtype)
    copy_gbps = copy_bandwidth_gbps() if DEVICE == "cuda" else copy_bandwidth_gbps(32 << 20)
    scale = 1 / math.sqrt(head_dim)
    rows = []
    for name, (locality, tables, contexts) in pick_steps(steps, min_batch):
        batch = len(contexts)
        query = torch.randn((batch, heads, head_dim), generator=gen).to(DEVICE, dtype)
        seq_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
        query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
        kv_bytes = 2 * sum(contexts) * kv_heads * head_dim * 2
        consecutive = consecutive_tables(contexts)
        layouts = {"serving": tables, "consecutive": consecutive, "random": random_like(consecutive, num_blocks, rng)}
        fns = {}
        for layout, layout_tables in layouts.items():
            block_tables = as_tensor(layout_tables)

            def fn(block_tables=block_tables):
                return torch.ops.cinfer.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,
                                                        query_start_loc, scale)

            expected = paged_attention_reference(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                 scale)
            err = (fn().float() - expected.float()).abs().max().item()
            if not err < 3e-2:
                raise SystemExit(f"{name} {layout}: max error {err} against the float32 reference")
            fns[layout] = fn
        times = bench_rounds_ms({layout: capture(fn) for layout, fn in fns.items()}, ROUNDS)
        ms = {layout: statistics.median(t) for layout, t in times.items()}
        for layout in fns:
            rows.append(dict(step=f"{name}: batch {batch}, {sum(contexts)} keys, locality {locality:.3f}",
                             layout=layout, us=1e3 * ms[layout],
                             pct_copy=100 * kv_bytes / (ms[layout] * 1e-3) / 1e9 / copy_gbps,
                             x_consecutive=ms["consecutive"] / ms[layout]))
    info = device_info()
    print(f"{info.get('device')}  torch {info['torch']}  triton {info['triton']}  copy {copy_gbps:.0f} GB/s; "
          f"{heads} / {kv_heads} heads x {head_dim}, block {BLOCK_SIZE}, a cache of {num_blocks} blocks")
    print_table(rows, ["step", "layout", "us", "pct_copy", "x_consecutive"])
    if args.out:
        write_json(os.path.join(args.out, "bench_decode_layouts.json"), dict(info=info, copy_gbps=copy_gbps, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
