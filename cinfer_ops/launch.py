"""Kernel launches, and compiling the kernels a pass of the model would launch, in parallel, without running them.

Every cinfer kernel is launched through ``launch``. On a cold start the runtime's warm-up would otherwise
JIT-compile each kernel variant at its first launch, one after the other (about 9 s for the Llama-3-8B shape on
an H100, ``benchmarks/RESULTS.md``). Inside ``compile_ahead()``, ``launch`` only asks Triton for the variant
(``JITFunction.warmup``) under Triton's ``AsyncCompileMode``, so the compiles run in a thread pool while the caller
goes on; Triton's MLIR and LLVM passes and ``ptxas`` run outside the GIL, so they overlap. The same threads then
load each compiled variant, which on a cold cache includes building its C launcher (a ``gcc`` run of about 0.3 s
per distinct signature, otherwise done at the first launch). Leaving the context waits for all of it.

Nothing is launched inside it: outputs are left unwritten and in-place ops (cache writes) change nothing, so the
model's results in that pass are garbage; only what launches depend on (shapes, dtypes, strides, alignment, the
launchers' choices) matters.

On CPU (Triton's interpreter) there is nothing to compile and ``compile_ahead`` changes nothing.
"""
import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

import torch


class _Ahead:
    """The loads ``compile_ahead`` has queued: each waits for its variant's compile, then loads it."""

    def __init__(self, executor: ThreadPoolExecutor, device: torch.device):
        self.executor = executor
        self.device = device
        self.loads = []
        self._queued: set[int] = set()

    def add(self, compiled) -> None:
        """``compiled``: what ``JITFunction.warmup`` returned, a compiled kernel or (a new variant under
        ``AsyncCompileMode``) a future of one, the same object for every launch of that variant. The executor
        runs tasks in submission order, so a variant's compile has started before its load waits for it."""
        if id(compiled) in self._queued:
            return
        self._queued.add(id(compiled))
        future = getattr(compiled, "future", None)

        def load():
            kernel = future.result() if future is not None else compiled
            with torch.cuda.device(self.device):
                try:
                    kernel.run  # noqa: B018 (the property builds the launcher and loads the binary)
                except Exception:  # e.g. out of shared memory: the launch will raise it where it belongs
                    pass

        self.loads.append(self.executor.submit(load))

    def wait(self) -> None:
        for load in self.loads:
            load.result()


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """The device's SM count, which launchers size grids by; on CPU (Triton's interpreter) any small number: 8."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


_ahead: ContextVar[_Ahead | None] = ContextVar("cinfer_compile_ahead", default=None)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or inside ``compile_ahead`` only the compile and load of that variant."""
    ahead = _ahead.get()
    if ahead is not None:
        ahead.add(kernel.warmup(*args, grid=grid, **kwargs))
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def compile_ahead(device: torch.device, max_workers: int | None = None):
    """Inside, cinfer's kernel launches on ``device`` (a GPU) compile and load their variants in ``max_workers``
    threads (default: one per CPU, at most 16) instead of running; on exit, wait for all of it (compile errors raise
    there)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    from triton.runtime._async_compile import AsyncCompileMode

    workers = max_workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="cinfer-compile") as executor, AsyncCompileMode(executor):
        ahead = _Ahead(executor, device)
        token = _ahead.set(ahead)
        try:
            yield
        finally:
            _ahead.reset(token)
        ahead.wait()
