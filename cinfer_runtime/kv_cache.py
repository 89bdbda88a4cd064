"""The paged KV cache: its shape (from the model's config), its size (from device memory) and its allocation.

Per layer one K and one V tensor ``[num_kv_blocks, block_size, num_kv_heads, head_dim]`` in the model's dtype
(layout: DESIGN.md). Fresh caches are filled with NaN so that a kernel reading a slot nobody wrote shows up in
the outputs instead of silently reading stale values.
"""
import logging
from dataclasses import dataclass

import torch

from cinfer_runtime.config import EngineConfig

logger = logging.getLogger("cinfer")

# On CPU there is no "free device memory" to fill: cap the cache, and aim for this many full-length sequences.
CPU_MAX_CACHE_BYTES = 256 << 20
CPU_FULL_LENGTH_SEQS = 4
# Device memory kept outside the cache beyond the step's activations: Inductor workspaces, the CUDA-graph pool,
# the caching allocator's fragmentation.
GPU_RESERVED_BYTES = 1 << 30


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


def activation_bytes(model: torch.nn.Module, config: EngineConfig) -> int:
    """Upper estimate of a step's peak activation memory: a few live ``[tokens, width]`` tensors of the widest
    layer (residual, normed input, q/k/v, gate/up/activation) for a full token budget, plus fp32 logits and the
    sampler's temporaries for a full batch."""
    cfg = model.config.get_text_config()
    spec = KVCacheSpec.from_model(model)
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    q_width = cfg.num_attention_heads * spec.head_dim
    per_token = (4 * cfg.hidden_size + 3 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
                 + q_width + 2 * spec.num_kv_heads * spec.head_dim) * itemsize
    logits = config.max_num_seqs * cfg.vocab_size * 4 * 4
    return 2 * per_token * config.max_num_batched_tokens + logits


def num_kv_blocks_for(model: torch.nn.Module, config: EngineConfig, device: torch.device) -> int:
    """How many blocks to allocate when the user did not say: the free device memory (up to
    ``gpu_memory_utilization`` of the card, minus the step's activations) on a GPU; a few full-length sequences,
    at most ``CPU_MAX_CACHE_BYTES``, on CPU."""
    per_block = KVCacheSpec.from_model(model).bytes_per_block(config.block_size)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = (total * config.gpu_memory_utilization - (total - free)
                  - activation_bytes(model, config) - GPU_RESERVED_BYTES)
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise RuntimeError(
                f"no device memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"gpu_memory_utilization={config.gpu_memory_utilization}; lower max_num_batched_tokens or "
                f"max_num_seqs, or raise gpu_memory_utilization")
        return num_blocks
    wanted = CPU_FULL_LENGTH_SEQS * config.max_blocks_per_seq
    return max(1, min(wanted, CPU_MAX_CACHE_BYTES // per_block))


def allocate_kv_caches(spec: KVCacheSpec, num_kv_blocks: int, block_size: int,
                       device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Returns (k_caches, v_caches): one ``[num_kv_blocks, block_size, num_kv_heads, head_dim]`` tensor per layer
    each, NaN-filled, in ``spec.dtype`` on ``device``."""
    shape = (num_kv_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    k_caches = [torch.full(shape, float("nan"), dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
    v_caches = [torch.full(shape, float("nan"), dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
    logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %d layers, %s)", num_kv_blocks, block_size,
                num_kv_blocks * block_size, num_kv_blocks * spec.bytes_per_block(block_size) / 2**30,
                spec.num_layers, str(spec.dtype).removeprefix("torch."))
    return k_caches, v_caches
