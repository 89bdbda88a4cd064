"""Triton's compile key of a launch, for tests that count kernel variants where nothing compiles (the interpreter).

Triton compiles a kernel once per key: its constexpr arguments, the launch options (num_warps, num_stages) and how it
specialises the other arguments: an int equal to 1 becomes a constant, ints divisible by 16 and 16-byte-aligned
pointers are flagged, and an int marked do_not_specialize is neither (jit.py's specialize_impl, triton 3.6 to 3.9).
"""
import inspect

import torch
import triton.language as tl


def _do_not_specialize(kernel) -> set:
    names = getattr(kernel, "do_not_specialize", None)  # a JITFunction
    if names is None:
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize")  # the interpreter's stand-in
    return set(names or ())


def compile_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The key Triton compiles ``kernel[grid](*args, **kwargs)`` under (equal keys: one compiled variant)."""
    params = inspect.signature(kernel.fn).parameters
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    no_spec = _do_not_specialize(kernel)
    key = []
    for name, value in bound.arguments.items():
        if params[name].annotation is tl.constexpr:
            key.append((name, "constexpr", value))
        elif value is None:
            key.append((name, "constexpr", None))
        elif isinstance(value, torch.Tensor):
            key.append((name, value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, bool):
            key.append((name, "u1"))
        elif isinstance(value, int):
            width = "i32" if -2**31 <= value < 2**31 else "i64"
            if name in no_spec:
                key.append((name, width))
            elif value == 1:
                key.append((name, "constexpr", 1))
            else:
                key.append((name, width, value % 16 == 0))
        elif isinstance(value, float):
            key.append((name, "fp32"))
        else:
            raise AssertionError(f"{name}: unexpected argument {value!r}")
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))
    return tuple(key) + options


class Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch's compile key and runs nothing."""

    def __init__(self, name: str, kernel):
        self.name = name
        self.kernel = kernel
        self.keys: set = set()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.keys.add(compile_key(self.kernel, args, kwargs))
        return launch
