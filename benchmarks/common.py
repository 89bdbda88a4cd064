"""Shared pieces of the benchmark scripts: device description, copy-bandwidth roofline, timing, output."""
import json
import os
import platform
import time

import torch


def device_info() -> dict:
    """Card, versions and host: every benchmark's JSON starts with this."""
    import transformers
    import triton

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(device="cpu: " + platform.processor())
    return info


def bench_ms(fn, warmup_ms: float = 50, rep_ms: float = 300, cuda_graph: bool = False) -> float:
    """Median milliseconds of fn() with CUDA events (triton.testing.do_bench, which flushes L2 before each call),
    or wall clock on CPU.

    cuda_graph=True captures one fn() call in a CUDA graph and times its replays instead: a kernel of a few tens
    of microseconds otherwise measures the Python launch path (custom-op dispatch, Triton's launcher) rather than
    the GPU, and inside the runtime these ops only ever run from CUDA graphs. L2 is still flushed between replays.
    """
    if torch.cuda.is_available():
        import triton.testing

        if cuda_graph:
            fn()  # compile, autotune and allocate outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written, GB/s), the memory roofline used everywhere."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)
