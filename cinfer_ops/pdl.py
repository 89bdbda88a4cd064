"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched as a programmatic dependent may start
while the kernel before it on the stream is still running, and must ``gdc_wait()`` before it touches anything
that kernel writes. A kernel that calls ``gdc_launch_dependents()`` lets such a dependent start early."""
import functools

import torch


def supports_pdl(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later (never the CPU interpreter)."""
    if device.type != "cuda":
        return False
    return _major_capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.cache
def _major_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]
