"""Sweep the streaming linear kernel (``cinfer_ops.linear``) against cuBLAS at decode shapes on the GPU.

Shapes: the projections of Llama-3-8B (fused q/k/v, o_proj, fused gate/up, down_proj, lm_head) and Llama-3.2-1B, in
bf16, at M = 1, 2, 4, 8, 16 rows. Every configuration is checked against cuBLAS first, then timed as in a decode
step: one CUDA graph runs the GEMM back to back over several copies of the weight (over 1 GB in all, so nothing is
served from L2) and the time per GEMM is the replay's over the copies. Timing one GEMM per replay with L2 flushed
before it (as ``triton.testing.do_bench`` does) charges each 20-90 us GEMM a cold start plus the flush's write-back,
and ranked configurations differently from the model. Reported as microseconds and as a fraction of the copy
bandwidth over the bytes the GEMM must move (weight + x + out).

    PYTHONPATH=. python benchmarks/tune_linear.py --out results/tune
    PYTHONPATH=. python benchmarks/tune_linear.py --smoke --out /tmp/tune     # CPU, interpreter, tiny shapes

Stage 1 times every configuration of ``candidates()`` at M = 2 (a batch-1 decode step: the runtime pads one row)
on the 8B shapes. Stage 2 re-times, at every M and shape, the best configurations of stage 1 and cuBLAS, interleaved.
Prints tables and a summary; writes ``tune_linear.json`` into ``--out``, whose ``linear_configs`` (the best config
per weight shape at M = 2, or null where cuBLAS was faster) is what the GPU's table in ``cinfer_ops.linear`` holds
(``H100_LINEAR_CONFIGS``, ``H200_LINEAR_CONFIGS``; add a table to ``GPU_LINEAR_CONFIGS`` for another card) and what
``bench_generate.py --linear-configs`` loads.
"""
import argparse
import dataclasses
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
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import bench_ms, copy_bandwidth_gbps, device_info, print_table, write_json  # noqa: E402
from benchmarks.models import PROJECTION_SHAPES  # noqa: E402
from cinfer_ops.linear import LinearConfig, linear_stream_triton  # noqa: E402

SHAPES = PROJECTION_SHAPES  # name: (N, K) of weight [N, K]
SMOKE_SHAPES = {"a": (48, 64), "b": (40, 96)}
ROWS = (1, 2, 4, 8, 16)
TIMING = dict(warmup_ms=25, rep_ms=100)


def candidates(smoke: bool = False) -> list[LinearConfig]:
    if smoke:
        return [LinearConfig(16, 32, 4, 2), LinearConfig(32, 64, 2, 1)]
    tiles = [(16, 256), (16, 512), (16, 1024), (32, 256), (32, 512), (64, 128), (64, 256), (128, 128)]
    stages = {16: (3, 4, 6), 32: (3, 4, 5), 64: (3, 4, 5), 128: (3, 4, 6)}
    return [LinearConfig(n, k, w, s) for (n, k), w in itertools.product(tiles, (4, 8))
            for s in stages[n] if n * k * 2 * s <= 196608]


def _label(c: LinearConfig) -> str:
    return f"n{c.block_n} k{c.block_k} w{c.num_warps} s{c.num_stages}"


def _compile_worker(job):
    """Compile configs into Triton's on-disk cache (a launch at the real K, so the same specialisation)."""
    configs, ks, device = job
    failed = {}
    for config in configs:
        for k in ks:
            try:
                x = torch.randn(2, k, device=device, dtype=torch.bfloat16)
                w = torch.randn(2 * config.block_n, k, device=device, dtype=torch.bfloat16)
                linear_stream_triton(x, w, config=config)
            except Exception as e:  # reported, then skipped by the timing process
                failed[_label(config)] = f"{type(e).__name__}: {e}"[:200]
    if device == "cuda":
        torch.cuda.synchronize()
    return failed


def precompile(configs, ks, jobs, device) -> dict:
    if jobs <= 0:
        return _compile_worker((configs, ks, device))
    failed = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(_compile_worker, [(configs[i::jobs], ks, device) for i in range(jobs)]):
            failed.update(result)
    return failed


class ShapeBench:
    def __init__(self, name, n, k, device, gen, chain_bytes):
        self.name, self.n, self.k = name, n, k
        self.w = (torch.randn(n, k, generator=gen, device=device) / math.sqrt(k)).to(torch.bfloat16)
        self.x = torch.randn(max(ROWS), k, generator=gen, device=device).to(torch.bfloat16)
        copies = min(max(math.ceil(chain_bytes / self.w.nbytes), 2), 32)
        self.chain = [self.w] + [self.w.clone() for _ in range(copies - 1)]  # back to back, as in a model

    def nbytes(self, m: int) -> int:
        return 2 * (self.n * self.k + m * self.k + m * self.n)

    def check(self, config, m) -> str | None:
        x = self.x[:m]
        expected = F.linear(x.float(), self.w.float())
        out = linear_stream_triton(x, self.w, config=config).float()
        err = (out - expected).abs().max().item()
        tol = 2e-2 * expected.abs().max().item() + 1e-2
        return None if err <= tol else f"max error {err:.3g} > {tol:.3g}"

    def time_us(self, config, m, timing) -> float:
        """Microseconds per GEMM over the chain of weight copies, from one CUDA graph's replays."""
        x = self.x[:m]
        if config is None:
            def fn():
                for w in self.chain:
                    F.linear(x, w)
        else:
            def fn():
                for w in self.chain:
                    linear_stream_triton(x, w, config=config)
        return 1e3 * bench_ms(fn, cuda_graph=x.is_cuda, **timing) / len(self.chain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and two configs (CPU interpreter check)")
    parser.add_argument("--jobs", type=int, help="compile workers (default 8 on a GPU, 0 on CPU)")
    parser.add_argument("--finalists", type=int, default=4, help="configs per shape re-timed in stage 2")
    opts = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = opts.jobs if opts.jobs is not None else (8 if device == "cuda" else 0)
    shapes = SMOKE_SHAPES if opts.smoke else SHAPES
    configs = candidates(opts.smoke)
    result = {"device": device_info(), "rows": [], "summary": {}}
    bw = copy_bandwidth_gbps()
    result["copy_gbps"] = bw
    print(f"{result['device'].get('device')}: copy bandwidth {bw:.0f} GB/s")

    t0 = time.perf_counter()
    failed = precompile(configs, sorted({k for _, k in shapes.values()}), jobs, device)
    print(f"compiled {len(configs)} configs in {time.perf_counter() - t0:.0f} s; failed: {failed or 'none'}")
    configs = [c for c in configs if _label(c) not in failed]

    gen = torch.Generator(device=device).manual_seed(0)
    chain_bytes = 1.2e9 if device == "cuda" else 0
    benches = [ShapeBench(name, n, k, device, gen, chain_bytes) for name, (n, k) in shapes.items()]
    stage1 = [b for b in benches if b.name.startswith("8b.")] or benches

    def row(stage, bench, config, m, us):
        r = dict(stage=stage, shape=bench.name, m=m, config="cuBLAS" if config is None else _label(config), us=us,
                 pct_bw=100 * bench.nbytes(m) / (us * 1e-6) / 1e9 / bw)
        result["rows"].append(r)
        return r

    # Stage 1: every config at M = 2 on the 8B shapes.
    best: dict[str, list] = {}
    for bench in stage1:
        rows = [row("1", bench, None, 2, bench.time_us(None, 2, TIMING))]
        for config in configs:
            error = bench.check(config, 2)
            if error:
                result["rows"].append(dict(stage="1", shape=bench.name, m=2, config=_label(config), error=error))
                print(f"  {bench.name} {_label(config)}: WRONG ({error})")
                continue
            rows.append(row("1", bench, config, 2, bench.time_us(config, 2, TIMING)))
        rows.sort(key=lambda r: r["us"])
        print(f"\n== stage 1: {bench.name} (N={bench.n}, K={bench.k}), M=2")
        print_table(rows[:10], ["config", "us", "pct_bw"])
        best[bench.name] = [r["config"] for r in rows if r["config"] != "cuBLAS"][:opts.finalists]
        write_json(os.path.join(opts.out, "tune_linear.json"), result)

    # Score every config over all stage-1 shapes (geometric mean of time relative to the shape's best).
    by_config: dict[str, list[float]] = {}
    for bench in stage1:
        rows = [r for r in result["rows"] if r.get("stage") == "1" and r["shape"] == bench.name and "us" in r]
        fastest = min(r["us"] for r in rows)
        for r in rows:
            by_config.setdefault(r["config"], []).append(r["us"] / fastest)
    overall = sorted(((statistics.geometric_mean(v), c) for c, v in by_config.items()
                      if len(v) == len(stage1) and c != "cuBLAS"))
    finalists = list(dict.fromkeys([c for _, c in overall[:opts.finalists]]
                                   + [c for names in best.values() for c in names[:2]]))
    lookup = {_label(c): c for c in configs}
    result["summary"]["overall"] = [(c, s) for s, c in overall[:10]]

    # Stage 2: finalists and cuBLAS at every M and shape.
    final = []
    for bench in benches:
        for m in ROWS:
            for name in ["cuBLAS"] + finalists:
                config = None if name == "cuBLAS" else lookup[name]
                if config is not None and bench.check(config, m):
                    continue
                final.append(row("2", bench, config, m, bench.time_us(config, m, TIMING)))
        write_json(os.path.join(opts.out, "tune_linear.json"), result)
    table = []
    for bench in benches:
        for m in ROWS:
            rows = [r for r in final if r["shape"] == bench.name and r["m"] == m]
            cublas = next(r for r in rows if r["config"] == "cuBLAS")
            triton_rows = sorted((r for r in rows if r["config"] != "cuBLAS"), key=lambda r: r["us"])
            top = overall[0][1] if overall else None
            default = next((r for r in rows if r["config"] == top), None)
            if not triton_rows:
                continue
            table.append(dict(shape=bench.name, m=m, cublas_us=cublas["us"], cublas_pct=cublas["pct_bw"],
                              best=triton_rows[0]["config"], best_us=triton_rows[0]["us"],
                              best_pct=triton_rows[0]["pct_bw"],
                              top_us=default and default["us"], top_pct=default and default["pct_bw"],
                              speedup_top=default and cublas["us"] / default["us"]))
    print(f"\n== stage 2 (top overall config: {overall[0][1] if overall else None})")
    print_table(table, ["shape", "m", "cublas_us", "cublas_pct", "best", "best_us", "best_pct", "top_us", "top_pct",
                        "speedup_top"])
    result["summary"]["table"] = table
    # Per weight shape: the fastest config at M = 2 (a batch-1 step), or None where cuBLAS was at least as fast.
    linear_configs = {}
    for bench in benches:
        rows = sorted((r for r in final if r["shape"] == bench.name and r["m"] == 2), key=lambda r: r["us"])
        best_row = rows[0]
        linear_configs[f"{bench.n},{bench.k}"] = (None if best_row["config"] == "cuBLAS" else
                                                  dataclasses.astuple(lookup[best_row["config"]]))
    result["linear_configs"] = linear_configs
    print("\nlinear_configs (N,K -> block_n, block_k, num_warps, num_stages; null = cuBLAS):", linear_configs)
    write_json(os.path.join(opts.out, "tune_linear.json"), result)


if __name__ == "__main__":
    main()
