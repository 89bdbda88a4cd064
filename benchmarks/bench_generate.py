"""End-to-end generation: cinfer against HF transformers eager and static-cache-compiled `generate`, one process.

    PYTHONPATH=. python -m benchmarks.bench_generate --model llama3-8b --batch 1,16,64 --out benchmarks/out

Workload: random prompts of --prompt-len tokens, exactly --new-tokens generated (greedy, EOS ignored), per batch
size. Reports output tokens/s, time per output token (TPOT), time to first token (TTFT) and start-up time
(compile + CUDA-graph capture), plus the batch-1 roofline: weight bytes / copy bandwidth measured in this run.

Peers: ``cinfer`` (the defaults: on a GPU, async scheduling launches the next decode step before the previous
step's tokens are read), ``cinfer_sync`` (``async_scheduling=False``), ``cinfer_cublas`` (every linear on cuBLAS,
not the streaming kernel of ``cinfer_ops.linear``), ``cinfer_nopdl`` (no programmatic dependent launch),
``cinfer_whole`` (the rewritten graph compiled as one graph, not per distinct layer: ``graph_passes.layer_split``),
``cinfer_unfused`` (the gate/up projection and its activation as two kernels: ``silu_mul_pass.LINEAR_SILU_MUL``),
``cinfer_rope_unfused`` (RoPE and the cache write as a kernel of their own before attention at decode:
``rope_attention_pass.ROPE_ATTENTION``), ``cinfer_norms`` (each RMSNorm a kernel of its own, not split into the
projections around it: ``norm_linear_pass.SPLIT_NORMS``),
``hf_static``, ``hf_eager``. Each cinfer engine gets a KV cache sized
for the workload (twice the largest batch's tokens), not from free memory: a deleted engine's cache is not
returned to the device (its compiled graph keeps it alive), so the second engine of the run must fit beside it.
"""
import argparse
import gc
import importlib
import os
import time

import torch

from benchmarks.common import copy_bandwidth_gbps, device_info, print_table, write_json
from benchmarks.models import load_model, weight_bytes

linear_op = importlib.import_module("cinfer_ops.linear")  # the module (the package's ``linear`` is the op)
pdl = importlib.import_module("cinfer_ops.pdl")
layer_split = importlib.import_module("graph_passes.layer_split")
silu_mul_pass = importlib.import_module("graph_passes.silu_mul_pass")
rope_attention_pass = importlib.import_module("graph_passes.rope_attention_pass")
norm_linear_pass = importlib.import_module("graph_passes.norm_linear_pass")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def _row(peer, batch, new_tokens, total_s, ttft_s, startup_s):
    return dict(peer=peer, batch=batch, tok_s=batch * new_tokens / total_s, tpot_ms=(total_s - ttft_s) / max(new_tokens - 1, 1) * 1e3,
                ttft_ms=ttft_s * 1e3, startup_s=startup_s)


def bench_hf(model, prompts: torch.Tensor, new_tokens: int, static: bool) -> tuple[float, float, float]:
    """(total_s, ttft_s, startup_s) of HF generate; static=True uses cache_implementation="static", which
    compiles the forward itself; its first call (compile) is the start-up time."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"
    attn = torch.ones_like(prompts)

    def run(n):
        return model.generate(prompts, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, **kw)

    startup_s, _ = _timed(lambda: run(new_tokens))  # warm-up; for static, this compiles
    ttft_s, _ = _timed(lambda: run(1))
    total_s, out = _timed(lambda: run(new_tokens))
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return total_s, ttft_s, startup_s if static else 0.0


# peer -> (async_scheduling (None: the default), few-row linears on the streaming kernel (False: all on cuBLAS),
#          programmatic dependent launch (cinfer_ops.pdl), the graph compiled per distinct layer
#          (graph_passes.layer_split; False: as one graph), the gate/up projection fused with its activation,
#          RoPE fused into decode attention, norms split into the projections around them)
CINFER_PEERS = {"cinfer": (None, True, True, True, True, True, True),
                "cinfer_sync": (False, True, True, True, True, True, True),
                "cinfer_cublas": (None, False, True, True, True, True, True),
                "cinfer_nopdl": (None, True, False, True, True, True, True),
                "cinfer_whole": (None, True, True, False, True, True, True),
                "cinfer_unfused": (None, True, True, True, False, True, True),
                "cinfer_rope_unfused": (None, True, True, True, True, False, True),
                "cinfer_norms": (None, True, True, True, True, True, False)}
BLOCK_SIZE = 16


def bench_cinfer(model, prompts: torch.Tensor, new_tokens: int, max_num_seqs: int, engine=None,
                 async_scheduling: bool | None = None, max_tokens_per_seq: int = 0):
    import cinfer_runtime
    from cinfer_runtime import SamplingParams

    startup_s = 0.0
    if engine is None:
        num_kv_blocks = 2 * max_num_seqs * -(-max_tokens_per_seq // BLOCK_SIZE)
        startup_s, engine = _timed(lambda: cinfer_runtime.compile(
            model, block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs, num_kv_blocks=num_kv_blocks,
            async_scheduling=async_scheduling,
            # The warm-up, TTFT and timed runs repeat one prompt set: no cached prefixes between them (HF has none)
            enable_prefix_caching=False))
    token_lists = prompts.tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(token_lists, params, use_tqdm=False)  # warm-up at this batch size
    ttft_s, _ = _timed(lambda: engine.generate(token_lists, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), use_tqdm=False))
    total_s, outs = _timed(lambda: engine.generate(token_lists, params, use_tqdm=False))
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return total_s, ttft_s, startup_s, engine


def profile_cinfer(engine, prompts: torch.Tensor, new_tokens: int, path: str) -> None:
    """Torch-profiler summary of one cinfer generate (kernels by total device time, plus host ops), appended to
    ``path`` (one file for every batch size keeps the device machine's returned files few)."""
    from torch.profiler import ProfilerActivity, profile

    from cinfer_runtime import SamplingParams

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # The second run is the TTFT request alone (one new token: the prefill step); its host-side rows show how much
    # of the TTFT is launching kernels rather than running them.
    for n, sorts in ((new_tokens, (sort_by,)), (1, (sort_by, "cpu_time_total"))):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        with profile(activities=activities) as prof:
            _sync()
            start = time.perf_counter()
            engine.generate(prompts.tolist(), params, use_tqdm=False)
            _sync()
            wall_ms = (time.perf_counter() - start) * 1e3
        for key in sorts:
            table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
            head = (f"batch {prompts.shape[0]}, prompt {prompts.shape[1]}, {n} new tokens, "
                    f"{wall_ms:.1f} ms under the profiler, sorted by {key}")
            with open(path, "a") as f:
                f.write(f"{head}\n{table}\n")
            print(head + "\n" + table)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="llama3-8b | llama3-1b | tiny | a local checkpoint folder")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--peers", default="cinfer,hf_static,hf_eager",
                    help="comma list of hf_static, hf_eager and " + ", ".join(CINFER_PEERS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one cinfer generate of N new tokens per batch size (0: off)")
    ap.add_argument("--linear-configs", metavar="JSON",
                    help="per-shape streaming-linear configs (tune_linear.json) instead of cinfer_ops.linear's table")
    args = ap.parse_args()
    if args.linear_configs:
        linear_op.LINEAR_CONFIGS = linear_op.load_linear_configs(args.linear_configs)
        print("linear configs:", linear_op.LINEAR_CONFIGS)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batch.split(",")]
    peers = args.peers.split(",")
    info = device_info()
    bw = copy_bandwidth_gbps()
    model = load_model(args.model, dtype, device)
    wbytes = weight_bytes(model)
    roofline = bw * 1e9 / wbytes
    print(f"{info.get('device')}  torch {info['torch']}  triton {info['triton']}  transformers {info['transformers']}")
    print(f"copy bandwidth {bw:.0f} GB/s; weights {wbytes / 1e9:.2f} GB; batch-1 roofline {roofline:.1f} tok/s")

    gen = torch.Generator().manual_seed(0)
    rows = []
    for peer in peers:
        engine = None  # one cinfer engine per peer, reused across batch sizes
        for batch in batches:
            prompts = torch.randint(1, model.config.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
            try:
                if peer in CINFER_PEERS:
                    (async_scheduling, stream_linear, use_pdl, split_layers, fuse_gated, fuse_rope,
                     split_norms) = CINFER_PEERS[peer]
                    saved = (linear_op.STREAM_ROWS, pdl.ENABLED, layer_split.ENABLED,
                             silu_mul_pass.LINEAR_SILU_MUL, rope_attention_pass.ROPE_ATTENTION,
                             norm_linear_pass.SPLIT_NORMS)
                    try:  # the ops pick kernels and launch options when a step runs or a CUDA graph is captured
                        linear_op.STREAM_ROWS = saved[0] if stream_linear else 0
                        pdl.ENABLED = saved[1] and use_pdl
                        layer_split.ENABLED = saved[2] and split_layers
                        silu_mul_pass.LINEAR_SILU_MUL = saved[3] and fuse_gated
                        rope_attention_pass.ROPE_ATTENTION = saved[4] and fuse_rope
                        norm_linear_pass.SPLIT_NORMS = saved[5] and split_norms
                        total, ttft, startup, engine = bench_cinfer(
                            model, prompts, args.new_tokens, max(batches), engine, async_scheduling=async_scheduling,
                            max_tokens_per_seq=args.prompt_len + args.new_tokens)
                    finally:
                        (linear_op.STREAM_ROWS, pdl.ENABLED, layer_split.ENABLED, silu_mul_pass.LINEAR_SILU_MUL,
                         rope_attention_pass.ROPE_ATTENTION, norm_linear_pass.SPLIT_NORMS) = saved
                    if args.profile:
                        profile_cinfer(engine, prompts, args.profile, f"{args.out}/profile_{peer}.txt")
                    if startup == 0.0:
                        startup = None
                    overlapped = engine.num_overlapped_steps  # so far on this engine: > 0 iff async overlapped
                else:
                    total, ttft, startup = bench_hf(model, prompts, args.new_tokens, static=(peer == "hf_static"))
                row = _row(peer, batch, args.new_tokens, total, ttft, startup)
                if peer in CINFER_PEERS:
                    row["overlapped_steps"] = overlapped
                    if startup is not None:  # the engine's own split of its start-up, and Dynamo's of its compile
                        row.update(engine.startup_times)
                        split = engine.paged_model.split_report
                        row.update(pieces=split.pieces, pieces_compiled=split.compiled)
                        print("torch.compile phases (s):\n" + torch._dynamo.utils.compile_times(repr="str",
                                                                                          aggregate=True))
                        print("inductor counters:", dict(torch._dynamo.utils.counters["inductor"]))
            except Exception as e:  # one peer failing must not hide the others' numbers
                row = dict(peer=peer, batch=batch, error=f"{type(e).__name__}: {e}"[:300])
            if batch == 1 and "tok_s" in row:
                row["pct_roofline"] = 100 * row["tok_s"] / roofline
            rows.append(row)
            print(row, flush=True)
        if engine is not None:
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    by = {(r["peer"], r["batch"]): r for r in rows}
    for r in rows:
        ref = by.get(("hf_static", r["batch"]))
        if r["peer"] in CINFER_PEERS and ref and "tok_s" in r and "tok_s" in ref:
            r["x_hf_static"] = r["tok_s"] / ref["tok_s"]
        sync = by.get(("cinfer_sync", r["batch"]))
        if r["peer"] == "cinfer" and sync and "tok_s" in r and "tok_s" in sync:
            r["x_cinfer_sync"] = r["tok_s"] / sync["tok_s"]
        for other in ("cinfer_cublas", "cinfer_nopdl", "cinfer_whole", "cinfer_unfused", "cinfer_rope_unfused",
                      "cinfer_norms"):
            o = by.get((other, r["batch"]))
            if r["peer"] == "cinfer" and o and "tok_s" in r and "tok_s" in o:
                r["x_" + other] = r["tok_s"] / o["tok_s"]
    print_table(rows, ["peer", "batch", "tok_s", "tpot_ms", "ttft_ms", "startup_s", "compile_s", "passes_s",
                       "inner_compile_s", "pieces_compiled", "cuda_graphs_s",
                       "pct_roofline", "x_hf_static",
                       "x_cinfer_sync", "x_cinfer_cublas", "x_cinfer_nopdl", "x_cinfer_whole", "x_cinfer_unfused",
                       "x_cinfer_rope_unfused", "x_cinfer_norms",
                       "overlapped_steps", "error"])
    write_json(f"{args.out}/bench_generate_{args.model.replace('/', '_')}.json",
               dict(info=info, copy_gbps=bw, weight_bytes=wbytes, roofline_tok_s=roofline, args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
