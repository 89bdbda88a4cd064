"""FX graph passes that rewrite an unmodified HF Llama-family model into cinfer's ops, as a ``torch.compile`` backend.

- ``compile_model(model, k_caches, v_caches)`` -> ``PagedModel``: the model over the runtime's paged KV cache
  (attention, RMSNorm and residual-add passes; see ``paged_model`` for how inputs enter the graph and the
  dynamic-shape rules).
- ``torch.compile(model, backend="cinfer")``: a plain model call with the norm passes only (no paged cache exists,
  so attention is left to SDPA; logged).
- ``run_passes`` / ``PASS_ORDER``: the pass manager; one module per pass.
"""
from graph_passes.attention_metadata import AttentionMetadata
from graph_passes.backend import cinfer_backend, register as _register_backend
from graph_passes.errors import GraphRewriteError
from graph_passes.paged_model import PagedModel, attention_window, compile_model
from graph_passes.pass_manager import PASS_ORDER, run_passes

_register_backend()

__all__ = ["AttentionMetadata", "GraphRewriteError", "PagedModel", "PASS_ORDER", "attention_window", "cinfer_backend",
           "compile_model", "run_passes"]
