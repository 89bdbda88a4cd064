"""Projection fusion: op counts, numerics against the unfused graph and HF eager, the one-copy weight layout (the
user's parameters become views of the fused constants), and where the pass must not fire."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graph_passes import compile_model, pass_manager
from graph_passes.fuse_projections_pass import CONSTANT_PREFIX, fuse_projections
from graph_passes.fx_utils import op_counts
from tests.graph_passes.tiny_models import VOCAB, PagedDriver, make_caches, make_model, run_scenario
from tests.tolerances import ELEMENTWISE, LOGITS, assert_close

# per layer: q, k, v, o, gate, up, down -> qkv, o, gate_up, down; plus lm_head
LINEARS_BEFORE, LINEARS_AFTER = 7, 4


def _constants(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: t for name, t in gm.named_buffers() if name.startswith(CONSTANT_PREFIX)}


def _storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def _assert_views_of(parts: list[torch.Tensor], constants: dict[str, torch.Tensor]) -> None:
    """``parts`` are consecutive rows, in order, of one of the graph's fused constants."""
    constant = next((c for c in constants.values()
                     if c.untyped_storage().data_ptr() == parts[0].untyped_storage().data_ptr()), None)
    assert constant is not None, "the parameter is not a view of a fused constant"
    rows = 0
    for p in parts:
        assert p.untyped_storage().data_ptr() == constant.untyped_storage().data_ptr()
        assert p.storage_offset() == constant.storage_offset() + rows * (p.numel() // p.shape[0])
        assert p.data_ptr() >= constant.data_ptr()
        assert p.data_ptr() + p.nbytes <= constant.data_ptr() + constant.nbytes
        rows += p.shape[0]
    assert rows == constant.shape[0]


def _assert_layers_alias_constants(model, constants) -> None:
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _assert_views_of([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], constants)
        _assert_views_of([mlp.gate_proj.weight, mlp.up_proj.weight], constants)
        if attn.q_proj.bias is not None:
            _assert_views_of([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], constants)
        if mlp.gate_proj.bias is not None:
            _assert_views_of([mlp.gate_proj.bias, mlp.up_proj.bias], constants)


def _copied_narrows(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.target == "contiguous" and n.args[0].target is torch.narrow]


def _eager_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("variant", ["llama3_gqa_rope_scaling", "llama_tied_bias", "qwen2", "llama_mqa"])
def test_paged_model_fuses_qkv_and_gate_up(variant):
    """Counts, logits against HF eager, and the user's model: same eager outputs, parameters now views of the
    fused constants, no extra parameter memory."""
    model = make_model(variant)
    layers = model.config.num_hidden_layers
    probe = torch.randint(0, VOCAB, (2, 9))
    eager_before, bytes_before = _eager_logits(model, probe), _storage_bytes(model)

    paged = compile_model(model, *make_caches(model), inner_backend="eager")
    run_scenario(model, paged, LOGITS)  # against HF eager of the (re-pointed) model itself

    assert paged.report["fuse_projections"] == 2 * layers
    before, after = paged.ops_before, op_counts(paged.graph_module)
    assert before["linear"] == LINEARS_BEFORE * layers + 1 and after["linear"] == 0  # the linear pass took them
    # the gate/up projection and its activation are one op (with the fused weight; cinfer.rms_stats_linear_silu_mul
    # once the norm pass split the norm before it), whose halves are no narrows: those left are q, k and v's
    projections = ("linear", "linear_silu_mul", "linear_add_rms_stats", "rms_stats_linear", "rms_stats_linear_silu_mul")
    assert sum(after[f"cinfer.{op}.default"] for op in projections) == LINEARS_AFTER * layers + 1
    assert after["cinfer.linear_silu_mul.default"] + after["cinfer.rms_stats_linear_silu_mul.default"] == layers
    assert after["narrow"] == 3 * layers
    assert not _copied_narrows(paged.graph_module), "an HF projection output needed a contiguous copy"
    # the RoPE pass ran before this one: its op (fused with attention by the last pass) now reads q, k and v as
    # column slices of the fused qkv output
    assert paged.report["rope"] == paged.report["rope_attention"] == layers
    # (the first layer's: later layers reuse its layout check and keep their trace-time fake values)
    node = next(n for n in paged.graph_module.graph.nodes if n.target is torch.ops.cinfer.rope_paged_attention.default)
    q, k, v = (n.meta["example_value"] for n in node.args[:3])  # row stride: the qkv width, not their own
    assert q.stride(0) == k.stride(0) == v.stride(0) == (q.shape[1] + 2 * k.shape[1]) * q.shape[2]
    # one weight constant per group, one bias constant per group with biases (Qwen2: q/k/v; llama_tied_bias: all)
    attn_bias = model.model.layers[0].self_attn.q_proj.bias is not None
    mlp_bias = model.model.layers[0].mlp.gate_proj.bias is not None
    constants = _constants(paged.graph_module)
    assert len(constants) == layers * (2 + attn_bias + mlp_bias)
    # Persistent buffers: a set of non-persistent names would enter AOTAutograd's cache key in a per-process order
    # (string hashing), so no second process could hit that cache.
    assert not paged.graph_module._non_persistent_buffers_set

    assert torch.equal(_eager_logits(model, probe), eager_before)
    _assert_layers_alias_constants(model, constants)
    assert _storage_bytes(model) == bytes_before


@pytest.mark.parametrize("variant, inner_backend", [("llama3_gqa_rope_scaling", "eager"),
                                                    ("qwen2", "inductor")])
def test_fused_logits_equal_unfused(variant, inner_backend, monkeypatch):
    model = make_model(variant, num_hidden_layers=1 if inner_backend == "inductor" else 2)
    reference_model = copy.deepcopy(model)
    fused = compile_model(model, *make_caches(model), inner_backend=inner_backend)
    unfused = compile_model(reference_model, *make_caches(reference_model), inner_backend=inner_backend)
    driver = PagedDriver(seed=1)
    for length in (11, 6):
        driver.add(length)
    steps = [[(0, 0, 10), (1, 0, 6)],   # prefill
             [(0, 10, 11)],             # decode of one
             [(0, 0, 11), (1, 0, 6)]]   # the same sequences again, re-written in place
    stats = torch._dynamo.utils.counters["stats"]
    for i, chunks in enumerate(steps):
        inputs = driver.step_inputs(chunks)
        if i == 0:  # compiles both, the reference without the projection pass
            with monkeypatch.context() as m:
                m.setattr(pass_manager, "fuse_projections", lambda gm, example_inputs=None: 0)
                expected = unfused(*inputs)
            actual = fused(*inputs)
            graphs = stats["unique_graphs"]
        else:
            expected, actual = unfused(*inputs), fused(*inputs)
        assert_close(actual, expected, ELEMENTWISE, torch.float32, msg=f"step {i}")
    assert stats["unique_graphs"] == graphs, "re-pointing the parameters made Dynamo recompile"
    layers = model.config.num_hidden_layers
    assert fused.report["fuse_projections"] == 2 * layers and unfused.report["fuse_projections"] == 0
    assert_close(fused(*driver.step_inputs(steps[0])), driver.reference_logits(model, steps[0]), LOGITS,
                 torch.float32)


def test_inductor_end_to_end_with_biases():
    """Qwen2 (q/k/v biases) through Inductor: the fused constants are lifted like parameters."""
    model = make_model("qwen2", num_hidden_layers=1)
    paged = compile_model(model, *make_caches(model), inner_backend="inductor")
    run_scenario(model, paged, LOGITS)
    assert paged.report["fuse_projections"] == 2
    _assert_layers_alias_constants(model, _constants(paged.graph_module))


def test_second_compile_reuses_the_fused_storage():
    model = make_model("llama_tied_bias")
    driver = PagedDriver()
    driver.add(7)
    inputs = driver.step_inputs([(0, 0, 7)])
    first = compile_model(model, *make_caches(model), inner_backend="eager")
    logits = first(*inputs)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    first_constants = _constants(first.graph_module)

    second = compile_model(model, *make_caches(model), inner_backend="eager")
    assert_close(second(*inputs), logits, ELEMENTWISE, torch.float32)
    assert second.report == first.report
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    second_constants = _constants(second.graph_module)
    assert {k: (c.data_ptr(), c.shape) for k, c in second_constants.items()} == \
           {k: (c.data_ptr(), c.shape) for k, c in first_constants.items()}


# --- plain (unpaged) graphs ---------------------------------------------------------------------------------------

def compile_fusing(fn):
    """``torch.compile(fn)`` whose backend runs ``fuse_projections`` with the real example inputs, then the graph
    eagerly. The record (filled at the first call): op counts before/after and the groups fused."""
    record = {}

    def backend(gm, example_inputs):
        record["before"] = op_counts(gm)
        record["sites"] = fuse_projections(gm, list(example_inputs))
        record["after"] = op_counts(gm)
        record["gm"] = gm
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=True), record


def test_plain_hf_graph():
    model = make_model("llama3_gqa_rope_scaling")
    layers = model.config.num_hidden_layers
    compiled, record = compile_fusing(lambda ids: model(input_ids=ids, use_cache=False).logits)
    input_ids = torch.randint(0, VOCAB, (2, 7))
    expected = _eager_logits(model, input_ids)
    with torch.no_grad():
        actual = compiled(input_ids)
    assert record["sites"] == 2 * layers
    assert record["before"]["linear"] == LINEARS_BEFORE * layers + 1
    assert record["after"]["linear"] == LINEARS_AFTER * layers + 1
    assert_close(actual, expected, LOGITS, torch.float32)
    assert torch.equal(_eager_logits(model, input_ids), expected)


def test_registered_cinfer_backend_fuses(caplog):
    model = make_model("qwen2", num_hidden_layers=1)
    compiled = torch.compile(model, backend="cinfer", fullgraph=True)
    input_ids = torch.randint(0, VOCAB, (2, 6))
    expected = _eager_logits(model, input_ids)
    with caplog.at_level(logging.INFO, logger="graph_passes"), torch.no_grad():
        actual = compiled(input_ids=input_ids, use_cache=False).logits
    assert_close(actual, expected, LOGITS, torch.float32)
    assert "fuse_projections=2" in caplog.text
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()


class _Projections(torch.nn.Module):
    """Two or three projections of ``x`` in the shapes the pass must or must not fuse."""

    def __init__(self, bias=(False, False), out_features=(4, 6)):
        super().__init__()
        self.projs = torch.nn.ModuleList(torch.nn.Linear(8, n, bias=b) for n, b in zip(out_features, bias))

    def forward(self, x):
        return tuple(p(x) for p in self.projs)


class _TwoInputs(_Projections):
    def forward(self, x):
        return self.projs[0](x), self.projs[1](x + 1)


class _WeightReadElsewhere(_Projections):
    def forward(self, x):
        return self.projs[0](x) + self.projs[0].weight.sum(), self.projs[1](x)


class _SameWeightTwice(_Projections):
    def forward(self, x):
        return self.projs[0](x), self.projs[0](x) * 2


class _MutationBetween(_Projections):
    def forward(self, x):
        h = x.clone()
        a = self.projs[0](h)
        h.mul_(2)
        return a, self.projs[1](h)


class _ViewOverLastDim(_Projections):
    """Flattens a projection with ``view``: needs the contiguous layout, which the fused output's narrow lacks."""

    def forward(self, x):
        return self.projs[0](x).view(-1), self.projs[1](x)


def _run(module, x, *, grad=False, autocast=False):
    compiled, record = compile_fusing(module)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        actual = compiled(x)
        expected = module(x)
    for a, e in zip(actual, expected):
        assert_close(a, e, ELEMENTWISE, a.dtype)
    return record


@pytest.mark.parametrize("module", [_Projections(), _Projections(bias=(True, True, True), out_features=(4, 2, 2))],
                         ids=["no_bias", "bias"])
def test_fires_on_projections_of_one_input(module):
    weights = [p.weight.detach().clone() for p in module.projs]
    record = _run(module, torch.randn(3, 5, 8))
    assert record["sites"] == 1
    assert record["before"]["linear"] == len(module.projs) and record["after"]["linear"] == 1
    for p, w in zip(module.projs, weights):
        assert torch.equal(p.weight, w)
    _assert_views_of([p.weight for p in module.projs], _constants(record["gm"]))


def test_strided_output_gets_a_contiguous_copy_where_needed():
    record = _run(_ViewOverLastDim(), torch.randn(3, 5, 8))
    assert record["sites"] == 1
    assert len(_copied_narrows(record["gm"])) == 1  # only the flattened one


@pytest.mark.parametrize("module, reason", [
    (_TwoInputs(), None),  # one linear per input: not even a candidate
    (_Projections(bias=(True, False)), "fusable as [1, 1]"),
    (_WeightReadElsewhere(), "is also read elsewhere in the graph"),
    (_SameWeightTwice(), "is also read elsewhere in the graph"),
    (_MutationBetween(), "mul_ may mutate in between"),
], ids=["different_inputs", "mixed_bias", "weight_read_elsewhere", "same_weight_twice", "mutation_between"])
def test_does_not_fire(module, reason, caplog):
    pointers = [p.data_ptr() for p in module.parameters()]
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        record = _run(module, torch.randn(3, 5, 8))
    assert record["sites"] == 0 and record["after"] == record["before"]
    assert [p.data_ptr() for p in module.parameters()] == pointers
    if reason is not None:
        assert reason in caplog.text


def test_does_not_fire_with_grad_enabled():
    """A constant weight would cut the parameters off from autograd."""
    module = _Projections()
    record = _run(module, torch.randn(3, 8), grad=True)
    assert record["sites"] == 0


def test_does_not_fire_under_autocast():
    """fp32 weights, bf16 outputs: the projection's dtype is autocast's choice, not the weight's."""
    record = _run(_Projections(), torch.randn(3, 8), autocast=True)
    assert record["sites"] == 0


def test_does_not_fire_on_weights_that_are_inputs():
    compiled, record = compile_fusing(lambda x, w1, w2: (F.linear(x, w1), F.linear(x, w2)))
    x, w1, w2 = torch.randn(3, 8), torch.randn(4, 8), torch.randn(6, 8)
    with torch.no_grad():
        compiled(x, w1, w2)
    assert record["sites"] == 0


def test_skips_weights_without_real_values(caplog):
    """Fake example inputs (or none): the parameters' values are unknown, nothing is fused."""
    module = _Projections()
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    with torch.no_grad():
        torch.compile(module, backend=backend, fullgraph=True)(torch.randn(3, 8))
    gm = captured["gm"]
    fakes = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
    with caplog.at_level(logging.DEBUG, logger="graph_passes"):
        assert fuse_projections(gm, fakes) == 0
        assert fuse_projections(gm, None) == 0
    assert "has no real value (FakeTensor)" in caplog.text


class _FunctionalProjections(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w_a, self.b_a = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(4))
        self.w_b, self.b_b = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.linear(x, self.w_a, self.b_a) * 2, F.linear(x, self.w_b, self.b_b)


def test_get_attr_weights():
    """Weights held by the GraphModule (``get_attr``), as in a symbolically traced graph with fake values."""
    module = _FunctionalProjections()
    gm = fx.symbolic_trace(module)
    x = torch.randn(3, 8)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.no_grad():
        FakeTensorProp(gm, mode).propagate(mode.from_tensor(x))
        expected = module(x)
        assert fuse_projections(gm) == 1
        actual = gm(x)
    assert op_counts(gm)["linear"] == 1
    for a, e in zip(actual, expected):
        assert_close(a, e, ELEMENTWISE, torch.float32)
    constants = _constants(gm)
    _assert_views_of([module.w_a, module.w_b], constants)
    _assert_views_of([module.b_a, module.b_b], constants)
