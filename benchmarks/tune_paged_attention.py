"""Sweep tile configurations of the Triton paged-attention kernels on the GPU.

Decode (split-KV kernel): 32 query / 8 kv heads, head_dim 128, block 16 at (batch, context) = (64, 4096),
(8, 32768), (256, 512); reported as GB/s of K/V read and as a fraction of device copy bandwidth, next to SDPA over
contiguous K/V. Prefill (flash kernel): 8 sequences x 2048 tokens, causal; TFLOP/s next to SDPA's flash backend.
Every configuration is checked against the fp32 reference before it is timed.

    PYTHONPATH=. python benchmarks/tune_paged_attention.py --out results/tune [--quick] [--dtype bfloat16]

Prints one table per case and writes ``tune_paged_attention.json`` (all rows, the device, and the best
configuration per case) into ``--out``. Copy the winners into DECODE_CONFIGS / PREFILL_CONFIGS /
DECODE_* in cinfer_ops/paged_attention.py.
"""
import argparse
import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, copy_bandwidth_gbps, device_info, print_table, write_json  # noqa: E402
from cinfer_ops.paged_attention import DecodeConfig, PrefillConfig, paged_attention_triton  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_CASES = [(64, 4096), (8, 32768), (256, 512)]
PREFILL_CASE = (8, 2048)


def make_inputs(q_lens, seq_lens, dtype, device="cuda", seed=0):
    """Caches holding exactly the needed blocks, in a random physical order."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks)
    physical = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    block_tables = torch.zeros((len(seq_lens), max(blocks)), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(blocks):
        block_tables[b, :n] = physical[used:used + n]
        used += n
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    v_cache = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device=device)
    query = torch.randn((sum(q_lens), NUM_HEADS, HEAD_DIM), dtype=dtype, device=device, generator=gen)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return query, k_cache, v_cache, block_tables, seq_lens_t, qsl, HEAD_DIM ** -0.5


def dense_kv(args):
    """The same K/V gathered contiguous, [batch, kv_heads, ctx, head_dim] (all sequences the same length)."""
    _, k_cache, v_cache, block_tables, seq_lens, _, _ = args
    ctx = int(seq_lens[0])
    k = k_cache[block_tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = v_cache[block_tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    return k, v


def sdpa_ms(q, k, v, causal):
    """Fastest of SDPA with enable_gqa and SDPA over K/V expanded to all query heads (expansion not timed)."""
    times = {}
    try:
        times["gqa"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
    except RuntimeError as e:  # a backend without GQA support
        print(f"  sdpa enable_gqa failed: {e}")
    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    times["expanded"] = bench_ms(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=causal))
    if causal:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        times["flash"] = bench_ms(flash)
    return min(times.values()), times


def fp32_reference(q, k, v, causal):
    """SDPA in fp32 over the dense K/V, expanded to all query heads: the check each configuration must pass."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                          v.float().repeat_interleave(group, 1), is_causal=causal)


def max_err(out, ref):
    return (out.float() - ref.float()).abs().max().item()


def tune_decode(dtype, quick, copy_gbps):
    if quick:
        space = [DecodeConfig(bn, w, s, p) for bn, w, s, p in itertools.product([64, 128], [4, 8], [2, 3], [None])]
    else:
        space = [DecodeConfig(bn, w, s, p) for bn, w, s, p in
                 itertools.product([32, 64, 128], [4, 8], [2, 3, 4], [None, 256, 512, 1024, 2048])]
    rows, best = [], {}
    for batch, ctx in DECODE_CASES:
        name = f"decode b{batch} ctx{ctx}"
        args = make_inputs([1] * batch, [ctx] * batch, dtype)
        kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * args[1].element_size()
        k, v = dense_kv(args)
        q = args[0].view(batch, NUM_HEADS, 1, HEAD_DIM)
        base_ms, base = sdpa_ms(q, k, v, causal=False)
        ref = fp32_reference(q, k, v, causal=False).view(batch, NUM_HEADS, HEAD_DIM)
        del k, v
        rows.append(dict(case=name, config="sdpa " + min(base, key=base.get), ms=base_ms,
                         gbps=kv_bytes / base_ms / 1e6, pct_copy=kv_bytes / base_ms / 1e6 / copy_gbps))
        case_rows = []
        for cfg in space:
            try:
                out = paged_attention_triton(*args, decode_config=cfg)
                err = max_err(out, ref)
                ms = bench_ms(lambda: paged_attention_triton(*args, decode_config=cfg))
            except Exception as e:  # out of resources etc.: report, keep sweeping
                rows.append(dict(case=name, config=str(cfg), error=type(e).__name__))
                continue
            gbps = kv_bytes / ms / 1e6
            row = dict(case=name, config=str(cfg), ms=ms, gbps=gbps, pct_copy=gbps / copy_gbps, vs_sdpa=base_ms / ms,
                       max_err=err, ok=err < 3e-2)
            case_rows.append(row)
        ok = [r for r in case_rows if r["ok"]]
        if ok:
            best[name] = min(ok, key=lambda r: r["ms"])
        rows += sorted(case_rows, key=lambda r: r["ms"])
        del args, ref
        torch.cuda.empty_cache()
    return rows, best


def tune_prefill(dtype, quick):
    if quick:
        space = [PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 64, 4, 3), PrefillConfig(128, 128, 8, 3),
                 PrefillConfig(64, 64, 4, 3), PrefillConfig(128, 32, 4, 3), PrefillConfig(128, 64, 8, 2)]
    else:
        space = [PrefillConfig(m, n, w, s) for m, n, w, s in
                 itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3, 4])]
    batch, seqlen = PREFILL_CASE
    name = f"prefill {batch}x{seqlen} causal"
    args = make_inputs([seqlen] * batch, [seqlen] * batch, dtype)
    flops = 4 * batch * NUM_HEADS * HEAD_DIM * seqlen * (seqlen + 1) / 2
    k, v = dense_kv(args)
    q = args[0].view(batch, seqlen, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    base_ms, base = sdpa_ms(q, k, v, causal=True)
    ref = fp32_reference(q, k, v, causal=True).transpose(1, 2).reshape(batch * seqlen, NUM_HEADS, HEAD_DIM)
    del k, v
    # Every SDPA backend is a row; the 'vs_sdpa' ratios use the flash backend (FlashAttention-2), the target's baseline.
    rows = [dict(case=name, config=f"sdpa {kind}", ms=ms, tflops=flops / ms / 1e9) for kind, ms in base.items()]
    base_ms = base["flash"]
    case_rows = []
    for cfg in space:
        try:
            out = paged_attention_triton(*args, prefill_config=cfg)
            err = max_err(out, ref)
            ms = bench_ms(lambda: paged_attention_triton(*args, prefill_config=cfg))
        except Exception as e:
            rows.append(dict(case=name, config=str(cfg), error=type(e).__name__))
            continue
        case_rows.append(dict(case=name, config=str(cfg), ms=ms, tflops=flops / ms / 1e9, vs_sdpa=base_ms / ms,
                              max_err=err, ok=err < 3e-2))
    ok = [r for r in case_rows if r["ok"]]
    best = {name: min(ok, key=lambda r: r["ms"])} if ok else {}
    return rows + sorted(case_rows, key=lambda r: r["ms"]), best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for tune_paged_attention.json")
    parser.add_argument("--quick", action="store_true", help="a handful of configurations per case")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--only", choices=["decode", "prefill"], help="run one half of the sweep")
    opts = parser.parse_args()
    assert torch.cuda.is_available(), "this script tunes the GPU kernels"
    dtype = getattr(torch, opts.dtype)
    info = device_info()
    copy_gbps = copy_bandwidth_gbps()
    print(f"{info.get('device')}  torch {info['torch']}  triton {info['triton']}  copy {copy_gbps:.0f} GB/s")
    result = dict(device=info, copy_gbps=copy_gbps, dtype=opts.dtype, rows=[], best={})
    if opts.only in (None, "decode"):
        rows, best = tune_decode(dtype, opts.quick, copy_gbps)
        print_table(rows, ["case", "config", "ms", "gbps", "pct_copy", "vs_sdpa", "max_err", "ok", "error"])
        result["rows"] += rows
        result["best"].update(best)
    if opts.only in (None, "prefill"):
        rows, best = tune_prefill(dtype, opts.quick)
        print_table(rows, ["case", "config", "ms", "tflops", "vs_sdpa", "max_err", "ok", "error"])
        result["rows"] += rows
        result["best"].update(best)
    print("\nbest per case:")
    for name, row in result["best"].items():
        print(f"  {name}: {row['config']}  {row['ms']:.3f} ms  x{row['vs_sdpa']:.2f} vs sdpa"
              + (f"  {row['pct_copy']:.0%} of copy bandwidth" if "pct_copy" in row else f"  {row['tflops']:.0f} TFLOP/s"))
    write_json(os.path.join(opts.out, "tune_paged_attention.json"), result)


if __name__ == "__main__":
    main()
