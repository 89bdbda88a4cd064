"""Continuous-batching workload: cinfer against HF `generate` in padded batches and HF's `generate_batch`.

    PYTHONPATH=. python -m benchmarks.bench_serving --model llama3-8b --out benchmarks/out

Workload (seeded): --num-requests requests, prompt lengths uniform in [64, 1024], output lengths uniform in
[64, 512], all submitted at once, EOS ignored. Reports output tokens/s (only the tokens each request asked for)
and p50/p99 request latency (submission to last token). ``--repeats N`` runs the workload N times on each cinfer
engine and reports the median run (by tokens/s) and every run's tokens/s: one run takes seconds and varies from
one to the next by more than most changes being measured.

Peers: ``cinfer`` (the defaults: async scheduling on a GPU), ``cinfer_sync`` (``async_scheduling=False``),
``cinfer_whole`` (the rewritten graph compiled as one graph, not per distinct layer: ``graph_passes.layer_split``),
``cinfer_rope_unfused`` (RoPE and the cache write as a kernel of their own before decode attention:
``rope_attention_pass.ROPE_ATTENTION``),
``hf_padded``, ``hf_generate_batch``. Each cinfer engine's KV cache holds --max-num-seqs requests of the workload's largest
length (no preemption at full concurrency) rather than filling free memory: a deleted engine's cache is not
returned to the device (its compiled graph keeps it alive), so the second cinfer engine must fit beside the first.
"""
import argparse
import gc
import importlib
import time

import torch

from benchmarks.common import compile_counts, device_info, print_table, write_json
from benchmarks.models import load_model


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def workload(n: int, vocab: int, prompt_range, output_range, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(prompt_range[0], prompt_range[1] + 1, (n,), generator=g).tolist()
    olens = torch.randint(output_range[0], output_range[1] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (p,), generator=g).tolist() for p in plens]
    return prompts, olens


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


# peer -> (async_scheduling (None: the default), the graph compiled per distinct layer (graph_passes.layer_split),
#          RoPE fused into decode attention (graph_passes.rope_attention_pass))
CINFER_PEERS = {"cinfer": (None, True, True), "cinfer_sync": (False, True, True), "cinfer_whole": (None, False, True),
                "cinfer_rope_unfused": (None, True, False)}
BLOCK_SIZE = 16


def run_cinfer(model, prompts, olens, max_num_seqs, peer="cinfer", repeats=1):
    import cinfer_runtime
    from cinfer_runtime import SamplingParams

    layer_split = importlib.import_module("graph_passes.layer_split")
    rope_attention_pass = importlib.import_module("graph_passes.rope_attention_pass")
    async_scheduling, split_layers, fuse_rope = CINFER_PEERS[peer]
    longest = max(len(p) + o for p, o in zip(prompts, olens))
    t0 = time.perf_counter()
    saved = layer_split.ENABLED, rope_attention_pass.ROPE_ATTENTION
    layer_split.ENABLED = saved[0] and split_layers
    rope_attention_pass.ROPE_ATTENTION = saved[1] and fuse_rope  # read when the engine compiles the graph
    try:
        engine = cinfer_runtime.compile(model, block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs,
                                        num_kv_blocks=max_num_seqs * -(-longest // BLOCK_SIZE),
                                        async_scheduling=async_scheduling,
                                        # the warm-up below reuses 8 of the workload's prompts: no cached prefixes
                                        enable_prefix_caching=False)
    finally:
        layer_split.ENABLED, rope_attention_pass.ROPE_ATTENTION = saved
    startup = time.perf_counter() - t0
    warm = prompts[:8]  # a short run first: the timed run starts with every variant compiled and every graph captured
    engine.generate(warm, [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * len(warm), use_tqdm=False)
    _sync()
    compiled = compile_counts()
    runs = []
    for _ in range(repeats):  # the same workload again on the same engine: the row is the median run
        start = time.perf_counter()
        ids = {engine.add_request(p, SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)): o
               for p, o in zip(prompts, olens)}
        latency, produced = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finish_reason is not None and out.request_id not in latency:
                    latency[out.request_id] = time.perf_counter() - start
                    produced += len(out.token_ids)
        elapsed = time.perf_counter() - start
        assert len(latency) == len(ids) and produced == sum(olens), (len(latency), produced, sum(olens))
        runs.append(dict(tok_s=sum(olens) / elapsed, elapsed_s=elapsed, p50_s=_pct(latency.values(), 50),
                         p99_s=_pct(latency.values(), 99)))
    compiled_in_run = {key: value - compiled[key] for key, value in compile_counts().items()}
    row = dict(peer=peer, **sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2], startup_s=startup,
               preemptions=engine.scheduler.num_preemptions, overlapped_steps=engine.num_overlapped_steps,
               compiled_in_run=compiled_in_run)
    if repeats > 1:
        row["tok_s_runs"] = [round(r["tok_s"]) for r in runs]
    return row


def run_hf_padded(model, prompts, olens, batch_size):
    """HF generate on left-padded batches of batch_size in submission order; each batch runs to its longest
    output. A request's latency is its batch's completion time; only requested tokens count."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    lat = []
    for i in range(0, len(prompts), batch_size):
        ps, os_ = prompts[i:i + batch_size], olens[i:i + batch_size]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
        n = max(os_)
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
        _sync()
        lat += [time.perf_counter() - start] * len(ps)
    elapsed = time.perf_counter() - start
    return dict(peer=f"hf_padded_{batch_size}", tok_s=sum(olens) / elapsed, elapsed_s=elapsed,
                p50_s=_pct(lat, 50), p99_s=_pct(lat, 99))


def run_hf_generate_batch(model, prompts, olens):
    """transformers' own continuous batching. It takes one max_new_tokens for all requests, so it runs every
    request to the longest output; only the requested tokens count (its extra tokens are its own cost)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max(olens), do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=cfg, record_timestamps=True)
    _sync()
    elapsed = time.perf_counter() - start
    lat = [elapsed] * len(prompts)
    return dict(peer="hf_generate_batch", tok_s=sum(olens) / elapsed, elapsed_s=elapsed, p50_s=_pct(lat, 50),
                p99_s=_pct(lat, 99), note="latency = batch completion; all requests run to the longest output",
                completed=len(outs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--prompt-range", default="64,1024")
    ap.add_argument("--output-range", default="64,512")
    ap.add_argument("--peers", default="cinfer,hf_padded,hf_generate_batch")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--repeats", type=int, default=1,
                    help="cinfer peers: run the workload this many times on one engine and report the median run "
                         "(a run of a few seconds varies by several percent from one to the next)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, getattr(torch, args.dtype), device)
    prompts, olens = workload(args.num_requests, model.config.vocab_size,
                              tuple(map(int, args.prompt_range.split(","))), tuple(map(int, args.output_range.split(","))))
    info = device_info()
    print(f"{info.get('device')}  torch {info['torch']}  transformers {info['transformers']}; "
          f"{len(prompts)} requests, {sum(map(len, prompts))} prompt / {sum(olens)} output tokens")
    rows = []
    for peer in args.peers.split(","):
        try:
            if peer in CINFER_PEERS:
                rows.append(run_cinfer(model, prompts, olens, args.max_num_seqs, peer, args.repeats))
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            elif peer == "hf_padded":
                rows.append(run_hf_padded(model, prompts, olens, 64))
            elif peer == "hf_generate_batch":
                if not hasattr(model, "generate_batch"):
                    continue
                rows.append(run_hf_generate_batch(model, prompts, olens))
        except Exception as e:
            rows.append(dict(peer=peer, error=f"{type(e).__name__}: {e}"[:300]))
        print(rows[-1], flush=True)
    best_hf = max((r["tok_s"] for r in rows if r["peer"] not in CINFER_PEERS and "tok_s" in r), default=None)
    for r in rows:
        if r["peer"] in CINFER_PEERS and best_hf and "tok_s" in r:
            r["x_best_hf"] = r["tok_s"] / best_hf
        for other in ("cinfer_sync", "cinfer_whole", "cinfer_rope_unfused"):
            o = next((x for x in rows if x["peer"] == other and "tok_s" in x), None)
            if r["peer"] == "cinfer" and o and "tok_s" in r:
                r["x_" + other] = r["tok_s"] / o["tok_s"]
    print_table(rows, ["peer", "tok_s", "elapsed_s", "p50_s", "p99_s", "startup_s", "x_best_hf", "x_cinfer_sync",
                       "x_cinfer_whole", "x_cinfer_rope_unfused", "preemptions", "overlapped_steps", "compiled_in_run",
                       "tok_s_runs", "error"])
    write_json(f"{args.out}/bench_serving_{args.model.replace('/', '_')}.json", dict(info=info, args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
