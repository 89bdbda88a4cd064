"""Where ``cinfer_runtime.compile`` spends its start-up: a cProfile of one compile of a random-weight model.

    PYTHONPATH=. python -m benchmarks.profile_startup --model llama3-8b --max-num-seqs 64 --out results/

Prints the engine's own split (compile / passes / inner compile / CUDA graphs), Dynamo's and Inductor's counters,
and the functions with the most cumulative time; writes ``profile_startup.txt`` into ``--out``. Run it twice on one
machine: the first run is the cold start, the second finds Inductor's and Triton's on-disk caches.
"""
import argparse
import cProfile
import io
import os
import pstats
import time

import torch

from benchmarks.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--num-kv-blocks", type=int, default=4096)
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    import cinfer_runtime

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, torch.bfloat16, device)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    engine = cinfer_runtime.compile(model, max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks)
    profiler.disable()
    total = time.perf_counter() - start
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("cumulative")
    stats.print_stats(args.top)
    stats.sort_stats("tottime").print_stats(25)
    lines = [f"start-up {total:.1f} s (under cProfile): {engine.startup_times}",
             "inductor counters: " + str(dict(torch._dynamo.utils.counters["inductor"])),
             "aot_autograd counters: " + str(dict(torch._dynamo.utils.counters["aot_autograd"])),
             torch._dynamo.utils.compile_times(repr="str", aggregate=True), stream.getvalue()]
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_startup.txt"), "a") as f:
        f.write(text + "\n\n")
    print(text[:6000])


if __name__ == "__main__":
    main()
