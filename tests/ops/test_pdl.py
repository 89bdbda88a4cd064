"""Programmatic dependent launch (cinfer_ops.pdl): the kernels launched with it still see every earlier write.

The GPU test replays one decoder layer's chain of ops (norm, GEMV, rope + cache write, decode attention, GEMV, a
long GEMV into a norm) as a CUDA graph with PDL on, each replay on new inputs, and requires every output and the
KV cache to equal, bit for bit, the same ops run eagerly with PDL off. A kernel that read its input before waiting
would read the previous replay's values, which differ.
"""
import importlib

import pytest
import torch

import cinfer_ops  # noqa: F401  (registers the ops)
from cinfer_ops import pdl
from tests.conftest import HAS_CUDA


def test_pdl_is_off_for_cpu_launches_and_when_disabled(monkeypatch):
    assert pdl.pdl_launch_options(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.pdl_enabled(torch.device("cuda", 0))  # decided before any CUDA query
    assert pdl.pdl_launch_options(torch.device("cuda")) == {"USE_PDL": False}


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 1024, 8, 2, 128, 16
WIDE = 16384  # a GEMV long enough (32 MB of weight) that a norm reading its output early would see stale rows


def _layer_weights(gen):
    def rnd(*shape, scale=1.0):
        return ((torch.rand(shape, generator=gen) * 2 - 1) * scale).to(torch.bfloat16).cuda()
    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return dict(w1=rnd(HIDDEN) + 1.5, w2=rnd(HIDDEN) + 1.5, w3=rnd(WIDE) + 1.5,
                wqkv=rnd(qkv_rows, HIDDEN, scale=0.05), wo=rnd(HIDDEN, HEADS * HEAD_DIM, scale=0.05),
                wwide=rnd(WIDE, HIDDEN, scale=0.05), wdown=rnd(HIDDEN, WIDE, scale=0.02))


def _layer(inp: dict, w: dict, k_cache, v_cache):
    ops = torch.ops.cinfer
    batch = inp["x"].shape[0]
    n1, r1 = ops.fused_add_rms_norm(inp["x"], inp["res"], w["w1"], 1e-5)
    qkv = ops.linear(n1, w["wqkv"], None)
    q = qkv[:, :HEADS * HEAD_DIM].view(batch, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(batch, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(batch, KV_HEADS, HEAD_DIM)
    q = ops.rope_kv_cache_write(q, k, v, inp["cos"], inp["sin"], k_cache, v_cache, inp["slots"])
    a = ops.paged_attention(q, k_cache, v_cache, inp["block_tables"], inp["seq_lens"], inp["qsl"], HEAD_DIM ** -0.5)
    o = ops.linear(a.view(batch, HEADS * HEAD_DIM), w["wo"], None)
    n2, r2 = ops.fused_add_rms_norm(o, r1, w["w2"], 1e-5)
    wide = ops.linear(n2, w["wwide"], None)
    n3 = ops.rms_norm(wide, w["w3"], 1e-5)
    return dict(r2=r2, n2=n2, wide=wide, out=ops.linear(n3, w["wdown"], None))


def _step_inputs(gen, ctx, block_tables):
    """Decode inputs for one token of each sequence at context ctx[i] (its slot is position ctx[i] - 1), over the
    int32 ``block_tables`` (CPU)."""
    batch = len(ctx)
    seq_lens = torch.tensor(ctx, dtype=torch.int32)
    pos = seq_lens.long() - 1
    slots = block_tables.gather(1, (pos // BLOCK)[:, None])[:, 0].long() * BLOCK + pos % BLOCK
    angle = pos[:, None].float() * torch.rand(HEAD_DIM // 2, generator=gen)[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    rnd = lambda *s: ((torch.rand(s, generator=gen) * 2 - 1) + 0.1).to(torch.bfloat16)  # noqa: E731
    return {k: t.cuda() for k, t in dict(
        x=rnd(batch, HIDDEN), res=rnd(batch, HIDDEN), cos=cos.to(torch.bfloat16), sin=sin.to(torch.bfloat16),
        slots=slots, seq_lens=seq_lens, qsl=torch.arange(batch + 1, dtype=torch.int32),
        block_tables=block_tables).items()}


def _launched_with_pdl(kernel) -> bool:
    caches = getattr(kernel, "device_caches", {})
    return any(getattr(k.metadata, "launch_pdl", False) for c in caches.values() for k in c[0].values())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm_90+")
@pytest.mark.parametrize("batch", [1, 3])
def test_pdl_chain_in_cuda_graph_equals_eager_without_pdl(batch, monkeypatch):
    gen = torch.Generator().manual_seed(batch)
    w = _layer_weights(gen)
    blocks_per_seq, steps = 24, 6
    ctx0 = [int(c) for c in torch.randint(BLOCK + 1, (blocks_per_seq - 1) * BLOCK - steps, (batch,), generator=gen)]
    num_blocks = batch * blocks_per_seq
    # Both caches start as the same random keys and values; positions past each context are NaN and never read.
    k_cache = torch.rand(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16).cuda() - 0.5
    v_cache = torch.rand(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16).cuda() - 0.5
    bt = torch.arange(num_blocks, dtype=torch.int32).view(batch, blocks_per_seq)
    bt = bt[:, torch.randperm(blocks_per_seq, generator=gen)]  # non-contiguous pages
    first = _step_inputs(gen, ctx0, bt)
    for i, c in enumerate(ctx0):
        for p in range(c - 1, blocks_per_seq * BLOCK):
            k_cache[bt[i, p // BLOCK], p % BLOCK] = float("nan")
            v_cache[bt[i, p // BLOCK], p % BLOCK] = float("nan")
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    static = {k: t.clone() for k, t in first.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles; it writes the first token's slots, as the replay will
        _layer(static, w, k_cache, v_cache)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _layer(static, w, k_cache, v_cache)
    assert _launched_with_pdl(importlib.import_module("cinfer_ops.linear")._stream_linear_kernel)

    for step in range(steps):
        inp = first if step == 0 else _step_inputs(gen, [c + step for c in ctx0], bt)
        for k, t in inp.items():
            static[k].copy_(t)
        graph.replay()
        monkeypatch.setattr(pdl, "ENABLED", False)
        ref = _layer(inp, w, k_ref, v_ref)
        monkeypatch.setattr(pdl, "ENABLED", True)
        torch.cuda.synchronize()
        for name, r in ref.items():
            assert torch.isfinite(r).all(), name
            assert torch.equal(outs[name], r), f"step {step}: {name} differs with PDL"
        assert torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0)), f"step {step}: k cache"
        assert torch.equal(v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0)), f"step {step}: v cache"
