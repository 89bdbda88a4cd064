"""The paged KV cache: its shape (from the model's config), its size and its allocation.

Its size, unless the user gives ``num_kv_blocks``: on a GPU, what is left of ``gpu_memory_utilization`` of the card
beside the peak memory of the engine's profile run (``measure_peak_memory``, ``num_kv_blocks_from_memory``: its
warm-up, largest step and largest sampling run over ``PROFILE_NUM_KV_BLOCKS`` blocks, then the engine swaps in
the real cache); on CPU, a few full-length sequences (``cpu_num_kv_blocks``).

Per layer one K and one V tensor ``[num_kv_blocks, block_size, num_kv_heads, head_dim]`` in the model's dtype
(layout: DESIGN.md). Fresh caches are filled with NaN so that a kernel reading a slot nobody wrote shows up in
the outputs instead of silently reading stale values.
"""
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cinfer_runtime.config import EngineConfig

logger = logging.getLogger("cinfer")

# On CPU there is no "free device memory" to fill: cap the cache, and aim for this many full-length sequences.
CPU_MAX_CACHE_BYTES = 256 << 20
CPU_FULL_LENGTH_SEQS = 4
# On a GPU the cache is sized after the warm-up, which runs over caches of this many blocks: its dummy steps read
# block 0 only and write nowhere (slot -1). Two or more, so that Dynamo keeps the block dim a symbol (a dim of
# size 1 would be specialised and the real cache would recompile the graph).
PROFILE_NUM_KV_BLOCKS = 4
# Device memory kept outside the cache beyond what the profile run measured and the CUDA graphs' logits: the graphs'
# activations (their private pool cannot reuse the blocks the eager steps freed) and the caching allocator's
# fragmentation.
GPU_RESERVED_BYTES = 512 << 20


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "KVCacheSpec":
        cfg = model.config.get_text_config()
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        return cls(cfg.num_hidden_layers, num_kv_heads, head_dim, dtype)

    def bytes_per_block(self, block_size: int) -> int:
        """K and V of every layer for ``block_size`` tokens."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * itemsize


def cpu_num_kv_blocks(model: torch.nn.Module, config: EngineConfig) -> int:
    """How many blocks to allocate on CPU when the user did not say: a few full-length sequences, at most
    ``CPU_MAX_CACHE_BYTES``."""
    per_block = KVCacheSpec.from_model(model).bytes_per_block(config.block_size)
    wanted = CPU_FULL_LENGTH_SEQS * config.max_blocks_per_seq
    return max(1, min(wanted, CPU_MAX_CACHE_BYTES // per_block))


def sizes_from_device_memory(config: EngineConfig, device: torch.device) -> bool:
    """True when the cache is sized from the memory the warm-up measured (``measure_peak_memory``): the user gave
    no ``num_kv_blocks`` and the model is on a GPU, whose memory torch's allocator accounts for."""
    return config.num_kv_blocks is None and device.type == "cuda"


@dataclass(frozen=True)
class DeviceMemory:
    """Device memory in bytes, as ``measure_peak_memory`` read it."""
    total: int           # the card's memory
    free: int            # free on the device after the warm-up (for every process)
    torch_reserved: int  # held by torch's caching allocator at that moment (in use or cached)
    torch_peak: int      # the most torch's allocator had allocated (live tensors) during the profile run

    @property
    def non_torch(self) -> int:
        """Device memory in use that torch's allocator does not hold: the CUDA context, loaded kernel images
        (Triton, Inductor, cuBLAS), NCCL, other processes on the card."""
        return (self.total - self.free) - self.torch_reserved


def measure_peak_memory(device: torch.device, profile_run: Callable[[], None]) -> DeviceMemory:
    """Run ``profile_run`` (the engine's warm-up, largest step and largest sampling, over a few cache blocks) and
    measure what it needed of ``device`` (a GPU).

    ``torch_peak`` counts every live tensor of the process at the worst moment: the weights, the runtime's buffers,
    the caches the run used, the activations and workspaces of its largest step. The others are read after it,
    once every kernel is loaded. Emptying torch's allocator cache first does not change ``non_torch`` (cached
    blocks leave ``total - free`` and ``torch_reserved`` alike) but hands the run's freed activations back to the
    device, where the cache's allocation can take them."""
    torch.cuda.reset_peak_memory_stats(device)
    profile_run()
    torch.cuda.synchronize(device)
    torch_peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(total=total, free=free, torch_reserved=torch.cuda.memory_reserved(device),
                        torch_peak=torch_peak)


def gpu_reserve_bytes(graph_batches: list[int], logits_row_bytes: int) -> int:
    """Device memory to keep outside the cache for what the profile run does not measure, because it happens after
    the cache is allocated: the CUDA graphs (captured over the final cache) keep each graph's logits
    ``[max(batch, 2), vocab]`` alive in their pool (``PagedModel`` pads a batch of one to two rows), plus
    ``GPU_RESERVED_BYTES`` (the graphs' activations, at most a ``PREFILL_GRAPH_MAX_TOKENS``-token step's, and
    the allocator's fragmentation). ``graph_batches``: the sequence count of each captured graph, empty without
    CUDA graphs; ``logits_row_bytes``: one row of logits (vocab x the logits' element size)."""
    return GPU_RESERVED_BYTES + sum(max(batch, 2) for batch in graph_batches) * logits_row_bytes


def num_kv_blocks_from_memory(memory: DeviceMemory, gpu_memory_utilization: float, reserve_bytes: int,
                              bytes_per_block: int) -> int:
    """How many cache blocks fit beside what serving needs, from the memory ``measure_peak_memory`` measured (vLLM
    sizes its cache from a profile run the same way).

    The engine may use ``total * gpu_memory_utilization`` bytes of the card. Serving needs, besides the cache:

    - ``non_torch = (total - free) - torch_reserved`` (``DeviceMemory.non_torch``): memory outside torch's
      allocator, which serving does not grow: the profile run loaded every kernel. Memory of other processes
      is in it too, so it counts against this engine's share, as it really is unavailable.
    - ``torch_peak``: the most torch had allocated during the profile run, whose step and sampling are the
      largest serving runs (``max_num_batched_tokens`` tokens, ``max_num_seqs`` rows): the weights and buffers
      plus the worst moment's activations. It also counts the run's few cache blocks, which the real cache
      replaces: a slight overestimate.
    - ``reserve_bytes`` (``gpu_reserve_bytes``): what the profile run could not measure (the CUDA graphs)
      and the allocator's fragmentation.

    Whatever torch holds now (``torch_reserved``) is thus replaced by the most it needed (``torch_peak``); the cache
    gets ``total * gpu_memory_utilization - non_torch - torch_peak - reserve_bytes``, in whole blocks of
    ``bytes_per_block``. Raises RuntimeError when not even one block fits.
    """
    budget = memory.total * gpu_memory_utilization - memory.non_torch - memory.torch_peak - reserve_bytes
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 1:
        gib = 2 ** 30
        raise RuntimeError(
            f"no device memory left for the KV cache: gpu_memory_utilization={gpu_memory_utilization} of "
            f"{memory.total / gib:.2f} GiB is {memory.total * gpu_memory_utilization / gib:.2f} GiB; in use "
            f"outside torch {memory.non_torch / gib:.2f} GiB, torch's peak in the profile run (weights and the "
            f"largest step) {memory.torch_peak / gib:.2f} GiB, reserve {reserve_bytes / gib:.2f} GiB; one block "
            f"needs {bytes_per_block / 2**20:.2f} MiB. Lower max_num_batched_tokens or max_num_seqs, or raise "
            f"gpu_memory_utilization")
    return num_blocks


def allocate_kv_caches(spec: KVCacheSpec, num_kv_blocks: int, block_size: int,
                       device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Returns (k_caches, v_caches): one ``[num_kv_blocks, block_size, num_kv_heads, head_dim]`` tensor per layer
    each, NaN-filled, in ``spec.dtype`` on ``device``."""
    shape = (num_kv_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    k_caches = [torch.full(shape, float("nan"), dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
    v_caches = [torch.full(shape, float("nan"), dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
    return k_caches, v_caches


def log_kv_cache(spec: KVCacheSpec, num_kv_blocks: int, block_size: int) -> None:
    logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %d layers, %s)", num_kv_blocks, block_size,
                num_kv_blocks * block_size, num_kv_blocks * spec.bytes_per_block(block_size) / 2**30,
                spec.num_layers, str(spec.dtype).removeprefix("torch."))
