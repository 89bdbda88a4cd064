"""cinfer's custom ops, registered in the ``cinfer`` namespace on import.

Each op lives in its own module: a float32 reference (the CPU implementation and the template the graph
passes match), a Triton kernel with its launcher (the CUDA implementation), the ``torch.library``
registration and the fake kernel that lets ``torch.compile`` trace it. See ``../shared/DESIGN.md`` for the
op contract.
"""
from cinfer_ops.rms_norm import MANY_ROWS, fused_add_rms_norm, rms_norm  # noqa: F401  (registers the ops)
from cinfer_ops.kv_cache_write import MANY_TOKENS, kv_cache_write  # noqa: F401
from cinfer_ops.paged_attention import paged_attention  # noqa: F401
from cinfer_ops.rope_kv_cache_write import rope_kv_cache_write  # noqa: F401
from cinfer_ops.rope_paged_attention import rope_paged_attention  # noqa: F401
from cinfer_ops.linear import linear, linear_silu_mul  # noqa: F401
from cinfer_ops.silu_mul import silu_mul  # noqa: F401
from cinfer_ops.norm_linear import linear_add_rms_stats, rms_stats_linear, rms_stats_linear_silu_mul  # noqa: F401

# The Triton launchers pick their kernel variants (constexprs, num_warps) from the model's shapes, the cache and
# fixed configs, plus a few thresholds on the step's size: token counts (these), and the decode batch, whose
# tiling changes in the wave band (paged_attention.decode_variant_batches). So steps below and at each
# threshold, and decode steps at the smallest and largest batch and where the band begins, compile every variant;
# the runtime's warm-up runs them (cinfer_runtime.model_runner.warm_up_steps).
VARIANT_TOKEN_THRESHOLDS = (MANY_ROWS, MANY_TOKENS)

__all__ = ["rms_norm", "fused_add_rms_norm", "kv_cache_write", "paged_attention", "rope_kv_cache_write",
           "rope_paged_attention", "linear",
           "linear_silu_mul", "silu_mul", "linear_add_rms_stats", "rms_stats_linear", "rms_stats_linear_silu_mul",
           "VARIANT_TOKEN_THRESHOLDS"]
