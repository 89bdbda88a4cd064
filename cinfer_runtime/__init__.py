"""cinfer's runtime: ``compile(model) -> Engine`` for batched generation over a paged KV cache.

One step: ``Scheduler.schedule()`` (continuous batching, chunked prefill, preemption by recompute, prefix caching)
-> ``ModelRunner.execute()`` (the compiled model, or a CUDA graph for decode and small prefill steps; the sampler) ->
``Scheduler.update()`` (append tokens, key the filled blocks, stop conditions, free blocks).
"""
from cinfer_runtime.engine import Engine, compile
from cinfer_runtime.outputs import RequestOutput
from cinfer_runtime.sampling_params import SamplingParams

__all__ = ["compile", "Engine", "SamplingParams", "RequestOutput"]
