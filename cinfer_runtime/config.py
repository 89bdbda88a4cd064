"""Engine configuration: the user's knobs, validated once, then resolved against the model.

``EngineConfig`` holds what ``cinfer_runtime.compile`` was given. ``resolve`` fills the values that depend on the
model (``max_model_len``, ``max_num_batched_tokens``); the engine fills ``num_kv_blocks`` (``kv_cache``: on CPU
once the device is known, on a GPU after the warm-up measured its memory). Every other module reads the resolved
config and never re-derives these numbers.
"""
from dataclasses import dataclass, replace


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# A chunked-prefill step processes at most this many tokens unless the user says otherwise: large enough that a
# prefill step is compute-bound, small enough that the activations stay a small fraction of device memory.
DEFAULT_CHUNKED_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before (block_manager.py)
    seed: int = 0                      # draws the per-request seeds of requests whose SamplingParams have none
    inner_backend: str = "inductor"    # what compiles the rewritten graph (graph_passes.compile_model)
    async_scheduling: bool = False     # launch the next decode step before reading this one's tokens (engine.py)

    def __post_init__(self) -> None:
        def fail(field: str, why: str):
            raise ValueError(f"EngineConfig.{field}={getattr(self, field)!r}: {why}")

        bs = self.block_size
        if not isinstance(bs, int) or bs < 8 or bs > 128 or bs & (bs - 1):
            fail("block_size", "must be a power of two from 8 to 128")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            fail("num_kv_blocks", "must be a positive int or None (size from device memory)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            fail("gpu_memory_utilization", "must be in (0, 1]")
        if not isinstance(self.async_scheduling, bool):
            fail("async_scheduling", "must be a bool")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            fail("max_num_seqs", "must be a positive int")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            fail("max_model_len", "must be a positive int or None (the model's max_position_embeddings)")
        if self.max_num_batched_tokens is not None:
            if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1:
                fail("max_num_batched_tokens", "must be a positive int or None")
            if (not self.enable_chunked_prefill and self.max_model_len is not None
                    and self.max_num_batched_tokens < self.max_model_len):
                fail("max_num_batched_tokens", f"without chunked prefill a whole prompt must fit one step, so it must "
                     f"be >= max_model_len={self.max_model_len}")

    def resolve(self, model_max_len: int) -> "EngineConfig":
        """Fill ``max_model_len`` (from the model's ``max_position_embeddings``) and ``max_num_batched_tokens``."""
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(f"EngineConfig.max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={model_max_len}")
        tokens = self.max_num_batched_tokens
        if tokens is None:
            # A decode step batches up to max_num_seqs tokens, so the budget must never be what limits it.
            base = DEFAULT_CHUNKED_BATCHED_TOKENS if self.enable_chunked_prefill else max_model_len
            tokens = max(base, self.max_num_seqs)
        return replace(self, max_model_len=max_model_len, max_num_batched_tokens=tokens)

    @property
    def max_blocks_per_seq(self) -> int:
        """Static width of ``block_tables``: enough blocks for a full-length sequence."""
        return cdiv(self.max_model_len, self.block_size)
