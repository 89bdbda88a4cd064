"""Kernel launches, and compiling the kernels a pass of the model would launch, in parallel, without running them.

Every cinfer kernel is launched through ``launch``. On a cold start the runtime's warm-up would otherwise
JIT-compile each kernel variant at its first launch, one after the other (about 9 s for the Llama-3-8B shape on
an H100, ``benchmarks/RESULTS.md``). Inside ``compile_ahead()``, ``launch`` only asks Triton for the variant
(``JITFunction.warmup``) under Triton's ``AsyncCompileMode``, so the compiles run in a thread pool while the caller
goes on; Triton's MLIR and LLVM passes and ``ptxas`` run outside the GIL, so they overlap. Leaving the context
waits for every compile. Nothing is launched inside it: outputs are left unwritten and in-place ops (cache writes)
change nothing, so the model's results in that pass are garbage, and only what launches depend on (shapes, dtypes,
strides, alignment, the launchers' choices) matters.

On CPU (Triton's interpreter) there is nothing to compile and ``compile_ahead`` changes nothing.
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

import torch

_compile_only: ContextVar[bool] = ContextVar("cinfer_compile_only", default=False)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or inside ``compile_ahead`` only the compile of that variant."""
    if _compile_only.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def compile_ahead(device: torch.device, max_workers: int | None = None):
    """Inside, cinfer's kernel launches on ``device`` (a GPU) compile their variants in ``max_workers`` threads
    (default: one per CPU, at most 16) instead of running; on exit, wait for every compile (errors raise there)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    from triton.runtime._async_compile import AsyncCompileMode

    workers = max_workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="cinfer-compile") as executor, AsyncCompileMode(executor):
        token = _compile_only.set(True)
        try:
            yield
        finally:
            _compile_only.reset(token)
