"""cinfer's ``torch.compile`` backends: run the pass manager on the Dynamo graph, then hand it to Inductor.

``torch.compile(model, backend="cinfer")`` on a plain HF model call: no paged cache exists there, so only the
norm and projection passes run (the latter re-points the fused parameters' ``.data`` into the stacked weights,
values unchanged); attention stays ``scaled_dot_product_attention`` (or eager attention) and this is logged at INFO
on the ``graph_passes.pass_manager`` logger. The paged backend used by ``compile_model`` lives in ``paged_model``.
"""
import logging
from collections.abc import Callable

import torch
from torch import fx

from graph_passes.pass_manager import run_passes

logger = logging.getLogger(__name__)


def start_compile_workers(inner_backend: str, device: torch.device) -> None:
    """Start Inductor's pool of compile workers (subprocesses that compile Triton kernels, or load them from the
    on-disk caches) now, as torch's own "inductor" backend does when Dynamo hands it a graph: they take seconds to
    import torch, and only a pool that is ready by the time Inductor emits (or reloads) kernels takes them off the
    main process. Call it before Dynamo traces (it is a no-op after the first call, on CPU, and for other inner
    backends)."""
    if inner_backend == "inductor" and torch.device(device).type == "cuda":
        from torch._inductor.async_compile import maybe_warm_pool
        maybe_warm_pool()


def compile_inner(gm: fx.GraphModule, example_inputs: list, inner_backend: str) -> Callable:
    """Compile the rewritten graph with ``inner_backend`` ("inductor", or any registered Dynamo backend such as
    "eager" / "aot_eager", which tests use to skip Inductor's compile time)."""
    if inner_backend == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)
    return torch._dynamo.lookup_backend(inner_backend)(gm, example_inputs)


def cinfer_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The ``"cinfer"`` Dynamo backend for a plain model call: norm and projection passes, then Inductor."""
    example_inputs = list(example_inputs)  # the projection pass swaps in fakes for the parameters it re-pointed
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    start_compile_workers("inductor", device)
    run_passes(gm, example_inputs)
    return compile_inner(gm, example_inputs, "inductor")


def register() -> None:
    if "cinfer" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(cinfer_backend, name="cinfer")
