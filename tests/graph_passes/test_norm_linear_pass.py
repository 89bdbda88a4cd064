"""The norm_linear pass: which norms fold into their projection on tiny HF models (through the whole pass pipeline),
that the compiled model computes what it computed without the pass, and the shapes where it must not fire."""
import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from graph_passes import compile_model, pass_manager, paged_model
from graph_passes.fx_utils import op_counts
from graph_passes.pass_manager import run_passes
from tests.graph_passes.test_compile_model import folded_norms
from tests.graph_passes.tiny_models import PagedDriver, make_caches, make_model
from tests.tolerances import ELEMENTWISE, assert_close

FOLDED_OPS = (torch.ops.cinfer.rms_norm_linear.default, torch.ops.cinfer.fused_add_rms_norm_linear.default)


def _compile_recording(model, monkeypatch, fold: bool = True):
    """``compile_model`` whose passes also record the graph's inputs (the parameters among them are the model's own
    tensors); with ``fold=False`` the norm_linear pass does nothing."""
    record = {}

    def passes(gm, example_inputs, **kwargs):
        record["inputs"] = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
        return run_passes(gm, example_inputs, **kwargs)

    monkeypatch.setattr(paged_model, "run_passes", passes)
    if not fold:
        monkeypatch.setattr(pass_manager, "fold_norms_into_linears", lambda gm: 0)
    return compile_model(model, *make_caches(model), inner_backend="eager"), record


def _folded_norm_weights(paged, record) -> list[int]:
    """data_ptr of the norm weight of every folded op in the rewritten graph."""
    ptrs = []
    for node in paged.graph_module.graph.nodes:
        if node.target in FOLDED_OPS:
            norm_weight = node.args[-3]
            ptrs.append(record["inputs"][norm_weight].data_ptr())
    return ptrs


STEPS = [[(0, 0, 12), (1, 0, 9)],                # prefill + the first chunk of another prompt
         [(0, 12, 13), (1, 9, 20), (2, 0, 5)],   # mixed
         [(1, 20, 21), (2, 5, 6)],               # decode of two
         [(2, 6, 7)]]                            # decode of one (the size-1 dims padded)


@pytest.mark.parametrize("variant,dtype", [("llama3_gqa_rope_scaling", torch.float32),
                                           ("llama3_gqa_rope_scaling", torch.bfloat16),
                                           ("mistral", torch.float32), ("qwen2", torch.float32),
                                           ("llama_tied_bias", torch.float32)])
def test_paged_model_folds_every_norm_into_its_projection(variant, dtype, monkeypatch):
    """Every layer's input norm (into q/k/v) and post-attention norm (into gate/up), and the final norm (into lm_head,
    through the logits rows' selection), unless the projection has a bias (Qwen2's q/k/v; llama_tied_bias's all but
    lm_head). The logits equal those of the same pipeline without this pass at every step."""
    model = make_model(variant, dtype=dtype)
    with monkeypatch.context() as m:
        folded, record = _compile_recording(model, m)
        driver = PagedDriver()
        for length in (13, 21, 7):
            driver.add(length)
        first = folded(*driver.step_inputs(STEPS[0]))  # compiles with the recording passes
    with monkeypatch.context() as m:
        unfolded, _ = _compile_recording(model, m, fold=False)
        expected_first = unfolded(*driver.step_inputs(STEPS[0]))

    layers = model.model.layers
    expected = [model.model.norm.weight]
    expected += [layer.input_layernorm.weight for layer in layers if layer.self_attn.q_proj.bias is None]
    expected += [layer.post_attention_layernorm.weight for layer in layers if layer.mlp.gate_proj.bias is None]
    assert sorted(_folded_norm_weights(folded, record)) == sorted(p.data_ptr() for p in expected)
    assert folded.report["norm_linear"] == len(expected) == folded_norms(model)
    assert unfolded.report["norm_linear"] == 0
    after = op_counts(folded.graph_module)
    left = after["cinfer.rms_norm.default"] + after["cinfer.fused_add_rms_norm.default"]
    assert left == 2 * len(layers) + 1 - len(expected)
    assert after["cinfer.linear.default"] == 4 * len(layers) + 1 - len(expected)

    # The CPU implementations compose the same references: equal up to the final norm running over the selected rows
    assert_close(first, expected_first, ELEMENTWISE, dtype)
    for chunks in STEPS[1:]:
        inputs = driver.step_inputs(chunks)
        assert_close(folded(*inputs), unfolded(*inputs), ELEMENTWISE, dtype, msg=str(chunks))


K, N = 32, 24


class _NormProjection(nn.Module):
    """An (optional) residual add, an RMSNorm and a projection, in the shapes the pass must or must not fold."""

    def __init__(self, residual=False, bias=False, norm_user=False, return_sum=False, select=None):
        super().__init__()
        self.norm = LlamaRMSNorm(K, eps=1e-5)
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)
        self.proj = nn.Linear(K, N, bias=bias)
        self.residual, self.norm_user, self.return_sum, self.select = residual, norm_user, return_sum, select

    def forward(self, x, residual, index, permutation):
        h = x + residual if self.residual else x
        n = self.norm(h)
        if self.select == "rows":          # as HF's lm_head input: hidden_states[:, logits_to_keep, :]
            n = n[:, index, :]
        elif self.select == "last_rows":
            n = n[:, -2:]
        elif self.select == "columns":     # a permutation of the normalised features: the norm cannot move past it
            n = n[:, :, permutation]
        outputs = [self.proj(n)]
        if self.norm_user:
            outputs.append(n * 2.0)
        if self.return_sum:
            outputs.append(h)
        return tuple(outputs)


def _run(module):
    """Compile ``module`` with the whole pass pipeline (a plain graph: no paged cache) and run it eagerly; returns the
    report and the op counts after the passes, and checks the outputs against the module."""
    record = {}

    def backend(gm, example_inputs):
        record["report"] = run_passes(gm, list(example_inputs))
        record["after"] = op_counts(gm)
        return gm.forward

    torch._dynamo.reset()  # every case is another instance of one forward: a fresh recompile budget each
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    inputs = torch.randn(2, 5, K), torch.randn(2, 5, K), torch.tensor([4, 0, 2]), torch.randperm(K)
    with torch.no_grad():
        for actual, expected in zip(compiled(*inputs), module(*inputs), strict=True):
            assert_close(actual, expected, ELEMENTWISE, torch.float32)
    return record["report"]["norm_linear"], record["after"]


@pytest.mark.parametrize("kwargs,op", [
    ({}, "cinfer.rms_norm_linear.default"),
    ({"residual": True}, "cinfer.fused_add_rms_norm_linear.default"),
    ({"residual": True, "return_sum": True}, "cinfer.fused_add_rms_norm_linear.default"),  # the sum's users rewired
    ({"select": "rows"}, "cinfer.rms_norm_linear.default"),
    ({"residual": True, "select": "rows"}, "cinfer.fused_add_rms_norm_linear.default"),
    ({"residual": True, "select": "last_rows"}, "cinfer.fused_add_rms_norm_linear.default"),
])
def test_folds(kwargs, op):
    sites, after = _run(_NormProjection(**kwargs))
    assert sites == 1 and after[op] == 1
    assert after["cinfer.linear.default"] == 0
    assert after["cinfer.rms_norm.default"] == after["cinfer.fused_add_rms_norm.default"] == 0


@pytest.mark.parametrize("kwargs", [
    {"norm_user": True},                                     # the normalised value has a second user
    {"residual": True, "norm_user": True},
    {"bias": True},                                          # the ops take no bias
    {"residual": True, "bias": True},
    {"residual": True, "select": "rows", "return_sum": True},  # the sum is needed for every row, not just those
    {"select": "columns"},                                   # the selection mixes the normalised features
], ids=["second_user", "second_user_add", "bias", "bias_add", "selected_rows_and_sum", "columns"])
def test_does_not_fold(kwargs):
    sites, after = _run(_NormProjection(**kwargs))
    assert sites == 0
    assert after["cinfer.rms_norm.default"] + after["cinfer.fused_add_rms_norm.default"] == 1
    assert after["cinfer.linear.default"] == 1
    assert after["cinfer.rms_norm_linear.default"] == after["cinfer.fused_add_rms_norm_linear.default"] == 0
