"""Prefill-sized projections (``M`` = 64-512 rows) on the GPU: how close each GEMM path comes to reading its weight
at copy bandwidth.

A batch-1 prefill of a 128-token prompt is a handful of GEMMs of M = 128 rows against each layer's weights: about
as many FLOPs as an H100 or H200 does in the time it reads those weights, so its floor is the weight read (3.76 ms
for Llama-3-8B on an H200) and its time to first token is decided by how near each GEMM runs to that floor. This
times, per Llama-3-8B (and 3.2-1B) projection and row count, every path the op could take:

- ``cublas`` / ``cublaslt``: ``F.linear`` with torch's preferred BLAS library set to each;
- ``inductor``: ``torch.compile(F.linear, mode="max-autotune-no-cudagraphs")``, Inductor's autotuned Triton GEMM
  templates (and cuBLAS among them) for that exact shape.

Each is timed as a model runs it: one CUDA graph runs the GEMM back to back over copies of the weight (over 1 GB in
all, so nothing comes from L2), ``common.bench_chain_ms``. Reported as microseconds, the fraction of copy bandwidth
over the bytes the GEMM must move (weight + x + out), and TFLOP/s.

    PYTHONPATH=. python -m benchmarks.bench_prefill_linear --out results/prefill_linear
    PYTHONPATH=. python -m benchmarks.bench_prefill_linear --smoke        # CPU: tiny shapes, cuBLAS path only
"""
import argparse
import math

import torch
import torch.nn.functional as F

from benchmarks.common import bench_chain_ms, copy_bandwidth_gbps, device_info, print_table, write_json
from benchmarks.models import PROJECTION_SHAPES

# name: (N, K) of weight [N, K]; lm_head is left out (a prefill computes the logits of one row per sequence)
SHAPES = {name: shape for name, shape in PROJECTION_SHAPES.items() if not name.endswith(".lm_head")}
SMOKE_SHAPES = {"a": (48, 64), "b": (40, 96)}


def _blas(library: str):
    def run(x, w):
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(library)
        try:
            return F.linear(x, w)
        finally:
            torch.backends.cuda.preferred_blas_library(previous)
    return run


def paths(smoke: bool) -> dict:
    if smoke or not torch.cuda.is_available():
        return {"F.linear": F.linear}
    return {"cublas": _blas("cublas"), "cublaslt": _blas("cublaslt"),
            "inductor": torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)}


def main(argv: list[str] | None = None) -> int:
    """Returns 0, or 1 when a path's output was wrong (it is then not timed)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="128", help="comma list of M")
    ap.add_argument("--shapes", default="8b.qkv,8b.o,8b.gate_up,8b.down", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--paths", default="cublas,cublaslt,inductor")
    ap.add_argument("--chain-mb", type=int, default=1024, help="bytes of weight copies one replay streams")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes.split(",")}
    rows = [2, 4] if args.smoke else [int(m) for m in args.rows.split(",")]
    chosen = {name: fn for name, fn in paths(args.smoke).items() if args.smoke or name in args.paths.split(",")}
    info = device_info()
    bw = copy_bandwidth_gbps()
    print(f"{info.get('device')}  torch {info['torch']}  triton {info['triton']}; copy bandwidth {bw:.0f} GB/s")

    gen = torch.Generator().manual_seed(0)
    results, failed = [], []
    for shape, (n, k) in shapes.items():
        w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device, torch.bfloat16)
        copies = min(max(math.ceil(args.chain_mb * 2**20 / w.nbytes), 2), 32)
        chain = [w] + [w.clone() for _ in range(copies - 1)]
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
            expected = F.linear(x.double(), w.double())
            nbytes = 2 * (n * k + m * k + m * n)
            for name, fn in chosen.items():
                err = (fn(x, w).double() - expected).abs().max().item()
                if not err <= 2e-2 * expected.abs().max().item():
                    failed.append(f"{shape} m={m} {name}: max error {err:.3g}")
                    continue
                ms = bench_chain_ms([lambda w=w_, fn=fn: fn(x, w) for w_ in chain])
                results.append(dict(shape=shape, n=n, k=k, m=m, path=name, us=ms * 1e3,
                                    pct_copy=100 * nbytes / (ms * 1e-3) / 1e9 / bw,
                                    tflops=2 * m * n * k / (ms * 1e-3) / 1e12))
                print(results[-1])
    print_table(results, ["shape", "m", "path", "us", "pct_copy", "tflops"])
    write_json(f"{args.out}/bench_prefill_linear.json", dict(info=info, copy_gbps=bw, rows=results, failed=failed))
    for line in failed:
        print("WRONG OUTPUT, not timed:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
