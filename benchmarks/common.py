"""Shared pieces of the benchmark scripts: device description, copy-bandwidth roofline, timing, output."""
import json
import math
import os
import platform
import statistics
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
            fn = capture(fn)
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def capture(fn):
    """fn() captured once in a CUDA graph (after one eager call that compiles and allocates); returns its replay.
    On CPU: fn itself."""
    if not torch.cuda.is_available():
        return fn
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_rounds_ms(fns: dict, rounds: int = 5) -> dict[str, list[float]]:
    """Each fn's bench_ms in each of ``rounds`` rounds, the fns in turn within a round. A ratio of two medians then
    compares calls timed minutes apart no more than calls timed side by side: clock and thermal drift over the run
    fall on every fn alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench_ms(fn))
    return times


def chain_length(nbytes: int, total: int = 1 << 30, most: int = 16) -> int:
    """How many copies of a call's buffers (``nbytes`` moved per call) make a chain of about ``total`` bytes, far
    more than L2 holds (50 MiB on an H100 or H200): at least 2, at most ``most``."""
    return max(2, min(most, math.ceil(total / max(nbytes, 1))))


def bench_chain_ms(fns, trials: int = 7, min_ms: float = 20.0) -> float:
    """Milliseconds per call, in steady state, of calls that each stream their own buffers (``chain_length`` of
    them, so that no call finds its inputs in L2): one CUDA graph runs every fn back to back and is replayed, timed
    by CUDA events over whole replays, with no L2 flush in between. That is how a decode step runs these ops, and
    how ``copy_bandwidth_gbps`` moves its 2 GiB. ``bench_ms`` instead flushes L2 before each call, which charges a
    kernel of tens of microseconds a cold start and the write-back of the flush's dirty lines. On CPU: the first
    fn's wall clock."""
    if not torch.cuda.is_available():
        return bench_ms(fns[0])
    for fn in fns:  # compile and allocate outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    outputs = []  # kept alive: every call writes its own output buffers, as the inputs are its own
    with torch.cuda.graph(graph):
        for fn in fns:
            outputs.append(fn())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    replays = max(1, math.ceil(min_ms / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(trials):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(fns)))
    del outputs
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written, GB/s), the memory roofline used everywhere."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def compile_counts() -> dict:
    """How much has been compiled in this process so far: Triton variants of cinfer's kernels, graphs Dynamo has
    made, Inductor FX-graph compiles. The difference across a timed run says whether the run compiled (a serving
    step whose kernel variant the warm-up never made pays its JIT inside the run)."""
    import importlib
    import pkgutil

    import triton

    import cinfer_ops

    variants = 0
    for info in pkgutil.iter_modules(cinfer_ops.__path__):
        module = importlib.import_module(f"cinfer_ops.{info.name}")
        for value in vars(module).values():
            if isinstance(value, triton.runtime.jit.JITFunction):
                variants += sum(len(cache[0]) for cache in value.device_caches.values())
    counters = torch._dynamo.utils.counters
    inductor = counters["inductor"]
    return dict(triton_variants=variants, dynamo_graphs=counters["stats"]["unique_graphs"],
                inductor_compiles=inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_hit"])


def runtime_block_tables(batch: int, ctx: int, block_size: int, prompt: int = 128, device="cpu") -> torch.Tensor:
    """int32 [batch, ctx / block_size]: the block tables the runtime's block manager (cinfer_runtime.block_manager,
    a fresh cache of exactly the blocks needed) gives ``batch`` sequences admitted together with ``prompt``-token
    prompts (bench_generate's) and then decoded together to ``ctx`` tokens: each prompt's blocks consecutive, then
    the sequences' decode blocks interleaved, one per sequence every block_size steps."""
    from cinfer_runtime.block_manager import BlockManager

    blocks_per_seq = -(-ctx // block_size)
    manager = BlockManager(batch * blocks_per_seq, block_size)
    first = min(prompt, ctx)
    for seq in range(batch):
        manager.grow(seq, first)
    for tokens in range(first + 1, ctx + 1, block_size):  # each step that starts a block
        for seq in range(batch):
            manager.grow(seq, tokens)
    return torch.tensor([manager.block_tables[seq] for seq in range(batch)], dtype=torch.int32, device=device)


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)
