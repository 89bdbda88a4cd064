"""The precompile child (``cinfer_runtime.precompile``): the spec it gets, the child end to end on CPU, when the
engine starts none, and ``Precompile.wait`` stopping a child that runs too long."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import cinfer_runtime
from cinfer_runtime.config import EngineConfig
from cinfer_runtime.precompile import KERNEL_OPTIONS, Precompile, precompile_spec, start_precompile

from .conftest import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA0 = torch.device("cuda", 0)  # start_precompile only reads the index before it spawns the child


def engine_config(**overrides) -> EngineConfig:
    kwargs = dict(block_size=8, max_num_seqs=5, max_num_batched_tokens=48, enable_prefix_caching=False,
                  inner_backend="eager", async_scheduling=True) | overrides
    return EngineConfig(**kwargs).resolve(128)


def qwen2(num_hidden_layers: int = 3) -> torch.nn.Module:
    """A Qwen2 config has a per-layer list (``layer_types``)."""
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(config).to(torch.bfloat16)


def test_spec_has_one_layer_and_the_parents_kernel_options():
    model, config = qwen2(), engine_config()
    spec = precompile_spec(model, config, "cuda:1")
    assert spec["config"]["num_hidden_layers"] == 1
    assert spec["config"]["layer_types"] == ["full_attention"]
    assert spec["config"]["hidden_size"] == 64 and spec["config"]["vocab_size"] == 96
    assert spec["dtype"] == "torch.bfloat16" and spec["device"] == "cuda:1"
    assert spec["buffer_dtypes"]["model.rotary_emb.inv_freq"] == "torch.bfloat16"  # .to() moved it
    assert spec["model_class"] == "transformers.models.qwen2.modeling_qwen2:Qwen2ForCausalLM"
    assert {name: spec["options"][name] for name in KERNEL_OPTIONS} == {name: getattr(config, name)
                                                                       for name in KERNEL_OPTIONS}
    assert spec["options"]["num_kv_blocks"] <= 64  # never sized from the device the parent shares
    assert spec["kernel_globals"]["stream_rows"] >= 0
    json.dumps(spec)


def test_child_compiles_a_one_layer_model_on_cpu():
    spec = precompile_spec(qwen2(), engine_config(), "cpu")
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "cinfer_runtime.precompile"], input=json.dumps(spec),
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["layers"] == 1 and summary["num_kv_blocks"] == spec["options"]["num_kv_blocks"]
    assert summary["dtype"] == "torch.bfloat16" and summary["device"] == "cpu"


def test_no_child_where_it_cannot_help(monkeypatch):
    monkeypatch.delenv("CINFER_PRECOMPILE", raising=False)
    model, config = tiny_llama(), engine_config()
    assert start_precompile(model, config, torch.device("cpu")) is None
    assert start_precompile(tiny_llama(num_hidden_layers=1), config, CUDA0) is None

    class LocalLlama(type(model)):  # a class the child could not import
        pass

    assert start_precompile(LocalLlama(model.config), config, CUDA0) is None
    monkeypatch.setenv("CINFER_PRECOMPILE", "0")
    assert start_precompile(model, config, CUDA0) is None


def test_child_started_for_a_describable_model(monkeypatch):
    monkeypatch.delenv("CINFER_PRECOMPILE", raising=False)
    precompile = start_precompile(tiny_llama(), engine_config(), CUDA0)
    assert precompile is not None
    precompile.close()  # the engine's path when its own compile raises
    assert precompile.process.poll() is not None
    precompile.wait()   # a no-op once closed
    assert precompile.wait_s == 0.0
    os.unlink(precompile.log_path)


def test_wait_stops_a_child_past_the_timeout(tmp_path, caplog):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    precompile = Precompile(process, str(tmp_path / "child.log"))
    with caplog.at_level(logging.INFO, logger="cinfer"):
        precompile.wait(timeout_s=0.5)
    assert process.poll() is not None
    assert 0.5 <= precompile.wait_s < 10
    assert "stopped" in caplog.text
    waited = precompile.wait_s
    precompile.wait(timeout_s=0.5)  # idempotent
    assert precompile.wait_s == waited


def test_wait_reaps_a_finished_child(tmp_path):
    log = tmp_path / "child.log"
    log.write_text("")
    precompile = Precompile(subprocess.Popen([sys.executable, "-c", "pass"]), str(log))
    precompile.wait()
    assert precompile.process.returncode == 0
    assert not log.exists()  # a successful child's log is removed


@pytest.mark.gpu
def test_engine_waits_for_the_child(gpu_model, monkeypatch, caplog):
    monkeypatch.setenv("CINFER_PRECOMPILE", "1")
    with caplog.at_level(logging.INFO, logger="cinfer"):
        engine = cinfer_runtime.compile(gpu_model, num_kv_blocks=64, max_num_seqs=4)
    assert "precompile child exited with code 0" in caplog.text
    assert engine.startup_times["precompile_wait_s"] >= 0.0
