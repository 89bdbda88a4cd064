"""cinfer's custom ops, registered in the ``cinfer`` namespace on import.

Each op lives in its own module: a float32 reference (the CPU implementation and the template the graph
passes match), a Triton kernel with its launcher (the CUDA implementation), the ``torch.library``
registration and the fake kernel that lets ``torch.compile`` trace it. See ``../shared/DESIGN.md`` for the
op contract.
"""
from cinfer_ops.rms_norm import fused_add_rms_norm, rms_norm  # noqa: F401  (registers the ops)
from cinfer_ops.kv_cache_write import kv_cache_write  # noqa: F401
from cinfer_ops.paged_attention import paged_attention  # noqa: F401
from cinfer_ops.rope_kv_cache_write import rope_kv_cache_write  # noqa: F401
from cinfer_ops.linear import linear  # noqa: F401

__all__ = ["rms_norm", "fused_add_rms_norm", "kv_cache_write", "paged_attention", "rope_kv_cache_write", "linear"]
