"""Sizing the KV cache: the budget arithmetic on made-up device numbers, and the engine's GPU start-up order (warm
up over a few blocks, measure, swap in the real cache, then build the scheduler) run on CPU with the measurement
faked: the swapped-in cache is what the scheduler and the model use, nothing recompiles, greedy outputs equal HF."""
import pytest
import torch

import cinfer_runtime
import cinfer_runtime.engine as engine_module
from cinfer_runtime import SamplingParams
from cinfer_runtime.config import EngineConfig
from cinfer_runtime.kv_cache import (GPU_RESERVED_BYTES, PROFILE_NUM_KV_BLOCKS, DeviceMemory, KVCacheSpec,
                                     cpu_num_kv_blocks, gpu_reserve_bytes, num_kv_blocks_from_memory)

from .conftest import MAX_TOKENS

GIB = 1 << 30
MIB = 1 << 20


def test_budget_is_the_share_minus_non_torch_memory_peak_and_reserve():
    # 80 GiB card, 90 %: 72 GiB usable. In use: 3 GiB outside torch (20 GiB used - 17 GiB torch holds); torch's
    # peak 16 GiB; reserve 1 GiB. Left: 72 - 3 - 16 - 1 = 52 GiB = 26 blocks of 2 GiB.
    memory = DeviceMemory(total=80 * GIB, free=60 * GIB, torch_reserved=17 * GIB, torch_peak=16 * GIB)
    assert memory.non_torch == 3 * GIB
    assert num_kv_blocks_from_memory(memory, 0.9, GIB, 2 * GIB) == 26
    # Partial blocks are dropped: 52 GiB in blocks of 3 GiB.
    assert num_kv_blocks_from_memory(memory, 0.9, GIB, 3 * GIB) == 17


def test_cached_torch_memory_does_not_count_but_other_processes_do():
    base = DeviceMemory(total=80 * GIB, free=60 * GIB, torch_reserved=17 * GIB, torch_peak=16 * GIB)
    blocks = num_kv_blocks_from_memory(base, 0.9, GIB, 64 * MIB)
    # Blocks torch's allocator keeps cached are no use to anyone else, but the cache may take them: they leave
    # `free` and join `torch_reserved` alike, and the budget stays.
    cached = DeviceMemory(total=80 * GIB, free=58 * GIB, torch_reserved=19 * GIB, torch_peak=16 * GIB)
    assert num_kv_blocks_from_memory(cached, 0.9, GIB, 64 * MIB) == blocks
    # Another process taking 2 GiB takes it from this engine's share.
    crowded = DeviceMemory(total=80 * GIB, free=58 * GIB, torch_reserved=17 * GIB, torch_peak=16 * GIB)
    assert num_kv_blocks_from_memory(crowded, 0.9, GIB, 64 * MIB) == blocks - 32
    # So does a larger peak (a larger step), and a larger reserve; a smaller share gives fewer blocks.
    assert num_kv_blocks_from_memory(base, 0.9, 2 * GIB, 64 * MIB) == blocks - 16
    peaky = DeviceMemory(total=80 * GIB, free=60 * GIB, torch_reserved=17 * GIB, torch_peak=17 * GIB)
    assert num_kv_blocks_from_memory(peaky, 0.9, GIB, 64 * MIB) == blocks - 16
    assert num_kv_blocks_from_memory(base, 0.8, GIB, 64 * MIB) == blocks - 128


def test_no_memory_left_raises_a_clear_error():
    # 10 GiB x 0.5 = 5 GiB usable; 1 + 3.5 + 0.5 GiB needed: exactly nothing left.
    memory = DeviceMemory(total=10 * GIB, free=8 * GIB, torch_reserved=GIB, torch_peak=7 * GIB // 2)
    with pytest.raises(RuntimeError, match="no device memory left for the KV cache") as err:
        num_kv_blocks_from_memory(memory, 0.5, GIB // 2, MIB)
    assert "gpu_memory_utilization=0.5" in str(err.value) and "max_num_batched_tokens" in str(err.value)
    # One block's worth less of reserve is exactly one block.
    assert num_kv_blocks_from_memory(memory, 0.5, GIB // 2 - MIB, MIB) == 1
    # More in use than the share: a negative budget raises too.
    with pytest.raises(RuntimeError, match="no device memory left"):
        num_kv_blocks_from_memory(memory, 0.1, GIB // 2, MIB)


def test_reserve_counts_every_decode_graph_output():
    assert gpu_reserve_bytes([], 1000) == GPU_RESERVED_BYTES
    # A bucket of one still gives two rows (PagedModel pads a batch of one).
    assert gpu_reserve_bytes([1, 2, 4, 8], 1000) == GPU_RESERVED_BYTES + (2 + 2 + 4 + 8) * 1000


def test_cpu_cache_holds_a_few_full_length_sequences(model):
    config = EngineConfig(block_size=8).resolve(model.config.max_position_embeddings)
    assert cpu_num_kv_blocks(model, config) == 4 * config.max_blocks_per_seq


def _fake_gpu(monkeypatch, memory_for, seen):
    """Take the GPU sizing path on CPU: ``measure_peak_memory`` runs the profile run and returns
    ``memory_for(runner)``; ``seen`` gets the runner's caches and config as the profile run found them."""
    def measure(device, run):
        runner = run.__self__  # ModelRunner.profile_run
        seen.update(caches=list(runner.model.k_caches + runner.model.v_caches), config=runner.config)
        run()
        return memory_for(runner)
    monkeypatch.setattr(engine_module, "sizes_from_device_memory", lambda config, device: config.num_kv_blocks is None)
    monkeypatch.setattr(engine_module, "measure_peak_memory", measure)


def test_cache_sized_after_the_warm_up_serves_without_recompiling(model, prompts, reference, monkeypatch):
    blocks_wanted = 40
    non_torch, torch_peak = 3 * MIB, 5 * MIB

    def memory_for(runner):
        per_block = KVCacheSpec.from_model(model).bytes_per_block(runner.config.block_size)
        needed = non_torch + torch_peak + GPU_RESERVED_BYTES + blocks_wanted * per_block + per_block // 2
        total = 2 * needed  # gpu_memory_utilization=0.5 below: `needed` is the share
        reserved = torch_peak + 7 * MIB
        return DeviceMemory(total=total, free=total - non_torch - reserved, torch_reserved=reserved,
                            torch_peak=torch_peak)

    seen = {}
    _fake_gpu(monkeypatch, memory_for, seen)
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    # The largest step: 300 tokens as sequences of 128, 128 and 44 (max_model_len 128).
    engine = cinfer_runtime.compile(model, block_size=8, gpu_memory_utilization=0.5, max_num_seqs=8,
                                    max_num_batched_tokens=300, inner_backend="eager")
    assert stats["unique_graphs"] == graphs + 1, "the profile run or the new cache recompiled the graph"
    # The warm-up ran over a few blocks; the engine then holds the measured number everywhere.
    assert {c.shape[0] for c in seen["caches"]} == {PROFILE_NUM_KV_BLOCKS}
    assert seen["config"].num_kv_blocks == PROFILE_NUM_KV_BLOCKS
    assert engine.config.num_kv_blocks == blocks_wanted
    assert engine.runner.config is engine.config
    assert engine.scheduler.block_manager.num_blocks == blocks_wanted
    assert engine.paged_model.k_caches == engine.k_caches and engine.paged_model.v_caches == engine.v_caches
    assert all(c.shape[0] == blocks_wanted and c.isnan().all() for c in engine.k_caches + engine.v_caches)
    assert set(engine.startup_times) >= {"compile_s", "passes_s", "inner_compile_s"}

    graphs, frames = stats["unique_graphs"], stats["calls_captured"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0) for m in MAX_TOKENS],
                               use_tqdm=False)
    assert stats["unique_graphs"] == graphs and stats["calls_captured"] == frames, "the new cache recompiled"
    assert [o.token_ids for o in outs] == reference
    # The requests' K/V went to the new cache (blocks the warm-up's caches did not have included).
    written = [b for b in range(blocks_wanted) if not engine.k_caches[0][b].isnan().all()]
    assert max(written) >= PROFILE_NUM_KV_BLOCKS
    assert all(c.isnan().all() for c in seen["caches"]), "the warm-up's caches were written after the swap"


def test_engine_without_memory_for_a_block_fails_in_compile(model, monkeypatch):
    memory = DeviceMemory(total=GIB, free=GIB // 4, torch_reserved=GIB // 2, torch_peak=GIB // 2)
    _fake_gpu(monkeypatch, lambda runner: memory, {})
    with pytest.raises(RuntimeError, match="no device memory left for the KV cache"):
        cinfer_runtime.compile(model, block_size=8, max_num_seqs=4, max_num_batched_tokens=16,
                               inner_backend="eager")


def test_a_given_num_kv_blocks_is_used_as_is(model, monkeypatch):
    def memory_for(engine):
        raise AssertionError("a given num_kv_blocks must not be measured for")
    _fake_gpu(monkeypatch, memory_for, {})
    engine = cinfer_runtime.compile(model, block_size=8, num_kv_blocks=11, max_num_seqs=4,
                                    max_num_batched_tokens=16, inner_backend="eager")
    assert engine.config.num_kv_blocks == 11 and engine.k_caches[0].shape[0] == 11
