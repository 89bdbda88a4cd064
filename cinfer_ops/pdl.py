"""Programmatic dependent launch (PDL) for cinfer's kernels on Hopper and later GPUs.

A kernel launched with PDL may start while the kernel before it in the stream is still running: it becomes
resident as soon as every program of its predecessor has called ``griddepcontrol.launch_dependents`` (or exited),
and its ``griddepcontrol.wait`` blocks until the predecessor has completed and its writes are visible. CUDA graphs
keep these edges, so a decode step replays with each kernel already resident and waiting when its predecessor ends:
the launch latency between dependent kernels leaves the critical path.

The rule every kernel here keeps: **nothing produced by an earlier kernel is read, and nothing is written, before
``pdl_wait``.** Only addresses, constant weights and a step's attention inputs (``seq_lens``, ``query_start_loc``,
``block_tables``, ``slot_mapping``: written before the step's first kernel, by the runtime's copies, never by a
kernel of the step) may be read before it. ``pdl_wait`` waits for the
predecessor to complete, and the predecessor completed only after its own wait, so this also orders a kernel after
every earlier one. Kernels that are not launched with PDL (Inductor's, cuBLAS') keep plain stream order.

``CINFER_PDL=0`` (or ``ENABLED = False`` before a launch or a CUDA-graph capture) turns it off. Triton's
interpreter has no ``griddepcontrol``, so CPU launches never use it.
"""
import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("CINFER_PDL", "1") != "0"


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` use PDL now (Hopper+ CUDA device, not the interpreter, ``ENABLED``)."""
    if not ENABLED or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch_options(device: torch.device) -> dict:
    """Keyword arguments for a launch of a kernel with a ``USE_PDL`` constexpr: the constexpr, plus Triton's
    ``launch_pdl`` option when PDL is on (the interpreter does not know the option, so it is left out otherwise)."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    """Let the next kernel in the stream launch (once every program of this one has called this or exited)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """The prologue of a short kernel: let the next kernel become resident now, then wait for the previous one."""
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
