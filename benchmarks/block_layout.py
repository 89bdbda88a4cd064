"""Where the runtime's block manager puts the KV blocks of a serving workload: how local its decode steps' block
tables are, next to a random permutation and the layouts the decode benchmarks time. CPU only, no model: the real
``Scheduler`` and ``BlockManager`` run bench_serving's workload (same seed), each request sampling a dummy token.

    PYTHONPATH=. python -m benchmarks.block_layout [--num-requests 512] [--max-num-seqs 256]

Why it matters: decode attention over the same K/V is 1-2.5% slower when every block sits in a random place than
when nearby blocks stay together (RESULTS.md runs CI, CJ: on an H100 any order that keeps runs of 8 blocks, or
groups of 2 MiB, together recovers most of it). bench_ops times its primary decode row over
``common.runtime_block_tables`` (a batch admitted and decoded together); this script checks what a long serving
run, where requests finish and their blocks are reused, looks like.

Locality measure, per decode step: the blocks its requests read at 8 consecutive logical positions (about one tile
window of the decode kernel across all running requests) fall into some number of 2 MiB regions of one layer's K
cache; ``regions per block`` is that number over the blocks, averaged over the windows (lower is more local; a
random permutation of a large cache is near 1). A block of Llama-3-8B's K cache (16 tokens x 8 kv heads x 128 x 2 B)
is 32 KiB, so 64 blocks share a region; Llama-3.2-1B's (head_dim 64) are 16 KiB, 128 a region. The measure is
a proxy: how it maps to decode time is not measured (runs CI, CJ timed whole layouts), and for a small cache a
random permutation scores low too (a window's blocks cover every region there is).
"""
import argparse
import random
import statistics

from benchmarks.bench_serving import BLOCK_SIZE, _pct, workload
from benchmarks.common import print_table, runtime_block_tables
from cinfer_runtime.block_manager import BlockManager
from cinfer_runtime.config import EngineConfig, cdiv
from cinfer_runtime.sampling_params import SamplingParams
from cinfer_runtime.scheduler import Scheduler
from cinfer_runtime.sequence import Sequence

WINDOW = 8


def regions_per_block(tables: list[list[int]], region_blocks: int, window: int = WINDOW) -> float:
    """Distinct regions of ``region_blocks`` blocks over blocks read, per window of logical positions."""
    regions = blocks = 0
    longest = max(map(len, tables), default=0)
    for start in range(0, longest, window):
        chunk = [b for t in tables for b in t[start:start + window]]
        regions += len({b // region_blocks for b in chunk})
        blocks += len(chunk)
    return regions / blocks if blocks else float("nan")


def random_like(tables: list[list[int]], num_blocks: int, rng: random.Random) -> list[list[int]]:
    """Tables of the same lengths over distinct blocks drawn at random from the cache."""
    drawn = iter(rng.sample(range(num_blocks), sum(map(len, tables))))
    return [[next(drawn) for _ in t] for t in tables]


def serving_steps(num_requests: int, max_num_seqs: int, prompt_range, output_range, every: int,
                  with_contexts: bool = False):
    """Block tables of every ``every``-th decode step of the workload (with ``with_contexts``: (tables, each
    request's context length in that step) pairs), the cache's block count and the number of decode steps."""
    prompts, olens = workload(num_requests, 32000, prompt_range, output_range)
    longest = max(len(p) + o for p, o in zip(prompts, olens))
    num_blocks = max_num_seqs * cdiv(longest, BLOCK_SIZE)  # as bench_serving sizes it
    config = EngineConfig(block_size=BLOCK_SIZE, num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          enable_prefix_caching=False).resolve(8192)
    scheduler = Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE))
    for i, (p, o) in enumerate(zip(prompts, olens)):
        scheduler.add(Sequence(seq_id=i, request_id=str(i), prompt_token_ids=p,
                               params=SamplingParams(max_tokens=o, ignore_eos=True), seed=i,
                               stop_token_ids=frozenset()))
    steps, decode_steps = [], 0
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        if out.is_decode:
            if decode_steps % every == 0:
                tables = [list(t) for t in out.block_tables]
                contexts = [seq.num_computed_tokens + n for seq, n in zip(out.seqs, out.num_new_tokens)]
                steps.append((tables, contexts) if with_contexts else tables)
            decode_steps += 1
        scheduler.update(out, [1] * sum(out.samples))
    return steps, num_blocks, decode_steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--prompt-range", default="64,1024")
    ap.add_argument("--output-range", default="64,512")
    ap.add_argument("--every", type=int, default=10, help="measure every N-th decode step")
    args = ap.parse_args()
    rng = random.Random(0)
    steps, num_blocks, decode_steps = serving_steps(args.num_requests, args.max_num_seqs,
                                                    tuple(map(int, args.prompt_range.split(","))),
                                                    tuple(map(int, args.output_range.split(","))), args.every)
    rows = []
    for region in (64, 128):
        serving = [regions_per_block(t, region) for t in steps]
        random_ = [regions_per_block(random_like(t, num_blocks, rng), region) for t in steps]
        rows.append(dict(layout=f"serving workload ({len(steps)} of {decode_steps} decode steps)",
                         region_blocks=region, median=statistics.median(serving), p90=_pct(serving, 90),
                         worst=max(serving)))
        rows.append(dict(layout="the same tables, blocks at random in the cache", region_blocks=region,
                         median=statistics.median(random_), p90=_pct(random_, 90), worst=max(random_)))
        for batch, ctx in ((64, 4096), (8, 32768), (256, 512)):
            tables = runtime_block_tables(batch, ctx, BLOCK_SIZE).tolist()
            bench_blocks = batch * cdiv(ctx, BLOCK_SIZE)
            rows.append(dict(layout=f"bench_ops decode b{batch} @ {ctx}: runtime layout", region_blocks=region,
                             median=regions_per_block(tables, region)))
            rows.append(dict(layout=f"bench_ops decode b{batch} @ {ctx}: random permutation", region_blocks=region,
                             median=regions_per_block(random_like(tables, bench_blocks, rng), region)))
    print(f"{args.num_requests} requests, max_num_seqs {args.max_num_seqs}, a cache of {num_blocks} blocks; "
          f"regions per block over windows of {WINDOW} logical positions (lower: more local)")
    print_table(rows, ["layout", "region_blocks", "median", "p90", "worst"])


if __name__ == "__main__":
    main()
