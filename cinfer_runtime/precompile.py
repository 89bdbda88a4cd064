"""Compile cinfer's Triton kernels in a child process while the engine's process traces and compiles the model.

On a GPU the engine's first model call spends most of a cold start in Dynamo and Inductor (tens of seconds for
an 8B model), and only then do its warm-up steps JIT-compile cinfer's own kernels (the ops' and the sampler's
variants), one after the other. Those kernels' variants follow the model's widths (hidden size, heads, head_dim,
vocab), the dtype and the engine options (block size, ``max_model_len``, batch and token limits), never its
depth. So ``start_precompile`` spawns ``python -m cinfer_runtime.precompile``, which builds the same model with
one layer and random weights on the same device and runs ``cinfer_runtime.compile`` on it with the same options:
its warm-up compiles the same variants into Triton's on-disk cache, where the parent's warm-up then finds them.

The parent waits for the child (``Precompile.wait``) once Inductor has compiled its graph, before the graph first
runs (``PagedModel.on_compiled``): from there on it would compile the same kernels itself, and its profile run
measures the device's memory, which must not include the child's. The child only ever costs the speedup: a
child that fails, or runs past the timeout (it is then stopped), leaves the parent compiling the kernels itself.
``CINFER_PRECOMPILE=0`` turns it off.
"""
import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple

import torch

import cinfer_runtime
from cinfer_runtime.config import EngineConfig
from cinfer_runtime.kv_cache import PROFILE_NUM_KV_BLOCKS

logger = logging.getLogger("cinfer")

# The child compiles exactly what the parent would compile next, so waiting for it is never slower than not
# having started it; the timeout only guards against a hung child.
WAIT_TIMEOUT_S = 120.0
# The EngineConfig fields that decide which kernel variants the warm-up compiles: the child gets the parent's.
KERNEL_OPTIONS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "enable_chunked_prefill",
                  "enable_prefix_caching", "enforce_eager", "async_scheduling", "inner_backend")


class Precompile:
    """A running child (``subprocess.Popen``) whose output goes to ``log_path``."""

    def __init__(self, process: subprocess.Popen, log_path: str):
        self.process = process
        self.log_path = log_path
        self.wait_s = 0.0  # how long ``wait`` blocked the parent
        self._started = time.perf_counter()
        self._done = False

    def wait(self, timeout_s: float = WAIT_TIMEOUT_S) -> None:
        """Block until the child exits, stopping it after ``timeout_s``. Idempotent; never raises."""
        if self._done:
            return
        start = time.perf_counter()
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        self.wait_s = time.perf_counter() - start
        if code is None:
            self.close()
            logger.info("precompile child still running after %.1f s of waiting: stopped (log: %s)",
                        self.wait_s, self.log_path)
            return
        self._finish(code)

    def close(self) -> None:
        """Stop the child if it still runs (the parent's compile failed, or ``wait`` timed out). Idempotent."""
        if self._done:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._done = True

    def _finish(self, code: int) -> None:
        self._done = True
        logger.info("precompile child exited with code %d after %.1f s; the engine waited %.1f s for it", code,
                    time.perf_counter() - self._started, self.wait_s)
        if code == 0:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)
        else:
            logger.debug("precompile child failed (the engine compiles its kernels itself); log: %s", self.log_path)


def start_precompile(model: torch.nn.Module, config: EngineConfig, device: torch.device) -> Precompile | None:
    """Spawn the child for ``model`` (the engine's, on ``device``) and the resolved ``config``. None where it would
    not help or cannot run: not a CUDA device, a model of fewer than 2 layers (the child would be the same work),
    ``CINFER_PRECOMPILE=0``, or a model ``precompile_spec`` cannot describe."""
    if device.type != "cuda" or os.environ.get("CINFER_PRECOMPILE", "1") == "0":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    spec = precompile_spec(model, config, f"cuda:{index}")
    if spec is None or model.config.num_hidden_layers < 2:
        return None
    env = dict(os.environ, CINFER_PRECOMPILE="0")
    # The parent may have found cinfer through sys.path rather than PYTHONPATH or its working directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    try:
        with tempfile.NamedTemporaryFile("w", prefix="cinfer-precompile-", suffix=".log", delete=False) as log:
            process = subprocess.Popen([sys.executable, "-m", "cinfer_runtime.precompile"], stdin=subprocess.PIPE,
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
    except OSError as e:  # no temp file or no process: the engine compiles its kernels itself
        logger.debug("precompile child not started: %s", e)
        return None
    try:
        with process.stdin:
            process.stdin.write(json.dumps(spec).encode())
    except OSError:  # the child already died: its exit code and log tell why
        pass
    logger.debug("precompile child %d started (log: %s)", process.pid, log.name)
    return Precompile(process, log.name)


def precompile_spec(model: torch.nn.Module, config: EngineConfig, device: str) -> dict | None:
    """What the child needs to rebuild ``model`` with one layer and compile it like the parent (a JSON-able dict),
    or None when the model cannot be described: no HF config, or a class the child could not import."""
    model_config = getattr(model, "config", None)
    if not hasattr(model_config, "to_dict") or not isinstance(getattr(model_config, "num_hidden_layers", None), int):
        return None
    classes = [_class_path(type(model)), _class_path(type(model_config))]
    if None in classes:
        return None
    num_layers = model_config.num_hidden_layers
    hf_config = model_config.to_dict()
    for key, value in hf_config.items():
        if isinstance(value, list) and len(value) == num_layers:  # one entry per layer (layer_types)
            hf_config[key] = value[:1]
    hf_config["num_hidden_layers"] = 1
    hf_config["attn_implementation"] = getattr(model_config, "_attn_implementation", None)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    # A model moved with .to(dtype) has its RoPE buffers in that dtype, one loaded with from_pretrained(dtype=...)
    # keeps them in float32: the child copies them, so that its graph is the parent's.
    buffer_dtypes = {name: str(b.dtype) for name, b in model.named_buffers() if b.is_floating_point()}
    # The child runs dummy steps only, which read block 0 and write nowhere, like the parent's profile run.
    options = {name: getattr(config, name) for name in KERNEL_OPTIONS} | {"num_kv_blocks": PROFILE_NUM_KV_BLOCKS}
    spec = {"model_class": classes[0], "config_class": classes[1], "config": hf_config, "dtype": str(dtype),
            "buffer_dtypes": buffer_dtypes, "device": device, "options": options, "kernel_globals": _kernel_globals()}
    try:
        json.dumps(spec)
    except (TypeError, ValueError):
        return None
    return spec


def _class_path(cls: type) -> str | None:
    """``module:qualname`` of a class another process can import, else None."""
    if cls.__module__ == "__main__":
        return None
    try:
        found = importlib.import_module(cls.__module__)
        for name in cls.__qualname__.split("."):
            found = getattr(found, name)
    except (ImportError, AttributeError):
        return None
    return f"{cls.__module__}:{cls.__qualname__}" if found is cls else None


def _import_class(path: str) -> type:
    module, qualname = path.split(":")
    found = importlib.import_module(module)
    for name in qualname.split("."):
        found = getattr(found, name)
    return found


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _kernel_globals() -> dict:
    """The cinfer_ops settings a process may change at run time (benchmarks do) that pick kernels or their
    variants: the child must pick the parent's."""
    linear = importlib.import_module("cinfer_ops.linear")  # the module (the package's ``linear`` is the op)
    pdl = importlib.import_module("cinfer_ops.pdl")
    return {"pdl_enabled": pdl.ENABLED, "stream_rows": linear.STREAM_ROWS, "prefetch_bytes": linear.PREFETCH_BYTES,
            "linear_configs": [[n, k, None if c is None else astuple(c)]
                               for (n, k), c in linear.LINEAR_CONFIGS.items()]}


def _set_kernel_globals(values: dict) -> None:
    linear = importlib.import_module("cinfer_ops.linear")
    pdl = importlib.import_module("cinfer_ops.pdl")
    pdl.ENABLED = values["pdl_enabled"]
    linear.STREAM_ROWS = values["stream_rows"]
    linear.PREFETCH_BYTES = values["prefetch_bytes"]
    linear.LINEAR_CONFIGS = {(n, k): None if c is None else linear.LinearConfig(*c)
                             for n, k, c in values["linear_configs"]}


def run_spec(spec: dict) -> dict:
    """The child's work: build the one-layer model (random weights, on the spec's device, in its dtype), compile it
    with the parent's options, and return a summary of what ran."""
    start = time.perf_counter()
    _set_kernel_globals(spec["kernel_globals"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton launches on the current device
    config = _import_class(spec["config_class"]).from_dict(spec["config"])
    dtype = _dtype(spec["dtype"])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in the dtype, as from_pretrained(dtype=...) does: no float32 copy
    try:
        with torch.device(device):
            model = _import_class(spec["model_class"])(config)
    finally:
        torch.set_default_dtype(default_dtype)
    buffers = dict(model.named_buffers())
    for name, buffer_dtype in spec["buffer_dtypes"].items():
        if name in buffers:  # the parent's layers past the first have no counterpart
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, buffers[name].to(_dtype(buffer_dtype)))
    engine = cinfer_runtime.compile(model.eval(), **spec["options"])
    return {"layers": len(engine.k_caches), "num_kv_blocks": engine.config.num_kv_blocks,
            "dtype": str(engine.k_caches[0].dtype), "device": str(engine.device),
            "seconds": round(time.perf_counter() - start, 2), "startup_times": engine.startup_times}


def main() -> None:
    """``python -m cinfer_runtime.precompile``: run the JSON spec on stdin; print a one-line JSON summary."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    print(json.dumps(run_spec(json.load(sys.stdin))), flush=True)


if __name__ == "__main__":
    main()
