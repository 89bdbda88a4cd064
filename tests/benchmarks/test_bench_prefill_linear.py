"""bench_prefill_linear end to end at its CPU smoke size: every path is checked against a float64 projection before
it is timed, and a wrong one is reported and fails the run."""
import json

import torch
import torch.nn.functional as F

from benchmarks import bench_prefill_linear


def test_smoke_run(tmp_path, capsys):
    assert bench_prefill_linear.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_prefill_linear.json").read_text())
    assert {(r["shape"], r["m"]) for r in result["rows"]} == {("a", 2), ("a", 4), ("b", 2), ("b", 4)}
    assert all(r["us"] > 0 for r in result["rows"]) and result["failed"] == []
    assert "pct_copy" in capsys.readouterr().out


def test_a_wrong_path_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_prefill_linear, "paths", lambda smoke: {"wrong": lambda x, w: F.linear(x, w) + 1})
    assert bench_prefill_linear.main(["--smoke", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "bench_prefill_linear.json").read_text())["failed"]


def test_projection_shapes_are_the_models_weights():
    """The derived (N, K) of each projection equals the stacked weights of a model built from the same config."""
    from benchmarks.models import load_model, projection_shapes

    model = load_model("tiny", torch.float32, "cpu")
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    stacked = lambda *ws: (sum(w.weight.shape[0] for w in ws), ws[0].weight.shape[1])  # noqa: E731
    shapes = projection_shapes("tiny")
    assert shapes["qkv"] == stacked(attn.q_proj, attn.k_proj, attn.v_proj)
    assert shapes["o"] == tuple(attn.o_proj.weight.shape)
    assert shapes["gate_up"] == stacked(mlp.gate_proj, mlp.up_proj)
    assert shapes["down"] == tuple(mlp.down_proj.weight.shape)
    assert shapes["lm_head"] == tuple(model.lm_head.weight.shape)
