"""Where ``cinfer_runtime.compile`` spends its start-up: a cProfile of one compile of a random-weight model.

    PYTHONPATH=. python -m benchmarks.profile_startup --model llama3-8b --max-num-seqs 64 --out results/

Prints the engine's own split (compile / passes / inner compile / CUDA graphs), the start-up phases Dynamo and
Inductor time themselves (a short table first, then all of them), their counters, and the functions with the most
cumulative time; writes ``profile_startup.txt`` into ``--out``. Run it twice on one machine: the first run is the
cold start, the second finds Inductor's, Triton's and AOTAutograd's on-disk caches. cProfile roughly doubles the
Python-bound phases (Dynamo tracing, the passes); ``--no-cprofile`` times them as a user sees them.

On CPU, ``--narrow`` keeps the model's depth and structure (32 layers of llama3-8b, GQA, llama3 RoPE) with small
widths: the start-up's Python side (Dynamo, passes, the caches' hit path) at the real graph size, in seconds:

    TORCHINDUCTOR_CACHE_DIR=/tmp/c OMP_NUM_THREADS=1 PYTHONPATH=. python -m benchmarks.profile_startup \
        --model llama3-8b --narrow --max-num-seqs 8 --num-kv-blocks 64 --no-cprofile     # twice: cold, warm
"""
import argparse
import cProfile
import io
import os
import pstats
import time

import torch

from benchmarks.models import CONFIGS, load_model

NARROW = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, vocab_size=512)

# Phases of a warm start, as torch._dynamo.utils.compile_times names them (torch 2.11), in the order they run.
WARM_START_PHASES = (
    ("bytecode_tracing", "Dynamo: trace the step function (fake-tensor propagation included)"),
    ("get_fake_value", "  of which fake-tensor propagation"),
    ("OutputGraph.call_user_compiler", "Dynamo -> our backend: graph passes + inner compile"),
    ("inductor_codecache_torch_key", "  hash of torch's sources (Inductor's cache keys)"),
    ("AOTAutogradCache.inductor_load", "  load the cached compiled graph"),
    ("PyCodeCache.load_by_key_path", "    import its Python module"),
    ("async_compile.precompile", "    Triton kernels compiled or loaded in this process"),
    ("async_compile.wait", "    waiting on kernels from the compile workers"),
    ("build_guards", "Dynamo: guards of the compiled graph"),
)


def phase_table(startup_times: dict[str, float]) -> str:
    headers, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    measured = dict(zip(headers, (float(v) for v in values)))
    rows = [f"{'s':>8}  phase"]
    for key, label in WARM_START_PHASES:
        if key in measured:
            rows.append(f"{measured[key]:8.2f}  {label} [{key}]")
    for key in ("passes_s", "inner_compile_s", "cuda_graphs_s", "compile_s"):
        if key in startup_times:
            rows.append(f"{startup_times[key]:8.2f}  engine.startup_times[{key!r}]")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--num-kv-blocks", type=int, default=4096)
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--no-cprofile", action="store_true", help="time the start-up without the profiler's overhead")
    ap.add_argument("--narrow", action="store_true", help="the model's depth and structure with small widths")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    import cinfer_runtime

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.narrow:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**{**CONFIGS[args.model], **NARROW})).to(torch.bfloat16).eval()
    else:
        model = load_model(args.model, torch.bfloat16, device)
    if device == "cpu":
        # Inductor probes the CPU's vector ISA by compiling test programs, once a process (seconds): not part of a
        # GPU start-up, so done before the clock starts.
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        pick_vec_isa()
    profiler = None if args.no_cprofile else cProfile.Profile()
    start, cpu_start = time.perf_counter(), time.thread_time()
    if profiler is not None:
        profiler.enable()
    engine = cinfer_runtime.compile(model, max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks)
    if profiler is not None:
        profiler.disable()
    total, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    lines = [f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}",
             f"start-up {total:.1f} s ({'under cProfile' if profiler else 'no profiler'}; main thread CPU "
             f"{cpu:.1f} s): {engine.startup_times}",
             phase_table(engine.startup_times),
             "inductor counters: " + str(dict(torch._dynamo.utils.counters["inductor"])),
             "aot_autograd counters: " + str(dict(torch._dynamo.utils.counters["aot_autograd"])),
             torch._dynamo.utils.compile_times(repr="str", aggregate=True)]
    if profiler is not None:
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream).sort_stats("cumulative")
        stats.print_stats(args.top)
        stats.sort_stats("tottime").print_stats(25)
        lines.append(stream.getvalue())
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_startup.txt"), "a") as f:
        f.write(text + "\n\n")
    print(text[:8000])


if __name__ == "__main__":
    main()
