"""How many Triton kernel variants an engine compiles: the launchers' compile keys must not follow the step's batch
size or token count, except at the thresholds ``cinfer_ops`` documents, and the runtime's warm-up steps must reach
every key a serving step can produce, so that no kernel compiles while serving or capturing CUDA graphs.

The interpreter used on CPU compiles nothing, so every kernel is stood in for by a recorder that computes the key
Triton would compile it under (tests/kernel_keys.py) and launches nothing (fast: no interpreter runs). On a GPU,
tests/runtime/test_engine_gpu.py watches Triton's real compile hook during ``generate``.
"""
import importlib

import pytest
import torch
import triton

import cinfer_ops
from cinfer_ops.kv_cache_write import kv_cache_write_triton
from cinfer_ops.paged_attention import decode_variant_batches, paged_attention_triton
from cinfer_ops.rms_norm import fused_add_rms_norm_triton, rms_norm_triton
from cinfer_runtime.cuda_graphs import decode_buckets, prefill_buckets
from cinfer_runtime.model_runner import warm_up_steps
from tests.kernel_keys import Recorder

OP_MODULES = [importlib.import_module(f"cinfer_ops.{name}")
              for name in ("paged_attention", "rms_norm", "kv_cache_write")]


@pytest.fixture
def recorders(monkeypatch) -> dict[str, Recorder]:
    """Every Triton function of the op modules replaced by a Recorder (device functions are never launched)."""
    found = {}
    for module in OP_MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.KernelInterface):
                found[name] = Recorder(name, obj)
                monkeypatch.setattr(module, name, found[name])
    assert {"_decode_kernel", "_prefill_kernel", "_rms_norm_kernel", "_kv_cache_write_kernel"} <= found.keys()
    return found


def keys_of(recorders: dict[str, Recorder], launch) -> dict[str, frozenset]:
    """The compile keys ``launch()`` produces, per kernel (the recorders are emptied first)."""
    for r in recorders.values():
        r.keys.clear()
    launch()
    return {name: frozenset(r.keys) for name, r in recorders.items() if r.keys}


def union(key_sets: list[dict[str, frozenset]]) -> dict[str, frozenset]:
    out: dict[str, frozenset] = {}
    for keys in key_sets:
        for name, k in keys.items():
            out[name] = out.get(name, frozenset()) | k
    return out


# A Llama-3-8B-like layer (GQA 32/8, head_dim 128, hidden 4096) in bf16, the runner's static buffer layout; shapes
# only, since nothing runs. The interpreter's device counts 8 "SMs", so decode steps split below batch 8 and not
# from it on: both sides of the decode kernel's one batch threshold occur.
class Layer:
    heads, kv_heads, head_dim, hidden, block_size, dtype = 32, 8, 128, 4096, 16, torch.bfloat16

    def __init__(self, max_batch: int, max_num_tokens: int, max_model_len: int):
        self.max_blocks = triton.cdiv(max_model_len, self.block_size)
        self.block_tables = torch.zeros(max_batch, self.max_blocks, dtype=torch.int32)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32)
        self.query_start_loc = torch.zeros(max_batch + 1, dtype=torch.int32)
        self.slot_mapping = torch.full((max_num_tokens,), -1, dtype=torch.int64)
        self.k_cache = torch.empty(64, self.block_size, self.kv_heads, self.head_dim, dtype=self.dtype)
        self.v_cache = torch.empty_like(self.k_cache)
        self.weight = torch.empty(self.hidden, dtype=self.dtype)

    def step(self, q_lens: list[int]) -> None:
        """Launch what one decoder layer of a step with these new-token counts launches."""
        num_tokens, batch = sum(q_lens), len(q_lens)
        x = torch.empty(1, num_tokens, self.hidden, dtype=self.dtype)
        rms_norm_triton(x, self.weight, 1e-5)
        fused_add_rms_norm_triton(x, torch.empty_like(x), self.weight, 1e-5)
        # q, k and v as views of one fused projection, as the projection pass leaves them
        qkv = torch.empty(num_tokens, (self.heads + 2 * self.kv_heads) * self.head_dim, dtype=self.dtype)
        q, k, v = qkv.view(num_tokens, -1, self.head_dim).split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        kv_cache_write_triton(k, v, self.k_cache, self.v_cache, self.slot_mapping[:num_tokens])
        paged_attention_triton(q, self.k_cache, self.v_cache, self.block_tables[:batch], self.seq_lens[:batch],
                               self.query_start_loc[:batch + 1], self.head_dim ** -0.5)


SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 17, 31, 32, 64, 100, 128, 129, 200, 255, 256]
TOKEN_COUNTS = SIZES + [511, 512, 1000, 1023, 1024, 1025, 2048, 3000, 4096, 5000]


@pytest.mark.parametrize("max_model_len,splits", [(4096, True), (1024, True), (1000, False), (128, False)])
def test_decode_steps_compile_one_variant_outside_the_wave_band(recorders, max_model_len, splits):
    # The default decode config (fused merge) splits a step into a number of splits that rises and falls with the
    # batch (DecodeConfig); its kernel variant must not follow it. Tables shorter than 2 least splits never split
    # (512 keys here: 8 kv heads on the interpreter's 8 "SMs" are more than a quarter of the target at batch 1).
    # The one exception is the wave band, more than 24 pairs here (batch 4 and up): one more variant, bn32 with 1
    # warp at one split, which decode_variant_batches names.
    layer = Layer(max_batch=256, max_num_tokens=256, max_model_len=max_model_len)
    per_batch = {b: keys_of(recorders, lambda: layer.step([1] * b)) for b in SIZES}
    band = [b for b in SIZES if b >= 4]
    assert decode_variant_batches(256, Layer.kv_heads, Layer.head_dim, torch.device("cpu")) == [1, band[0]]
    assert len({keys["_decode_kernel"] for b, keys in per_batch.items() if b not in band}) == 1
    assert len({keys["_decode_kernel"] for b, keys in per_batch.items() if b in band}) == 1
    (key,) = per_batch[1]["_decode_kernel"]
    assert [entry[2] for entry in key if entry[0] == "SPLIT"] == [splits]
    (wave,) = per_batch[band[0]]["_decode_kernel"]
    assert wave != key
    assert [entry[2] for entry in wave if entry[0] in ("SPLIT", "BLOCK_N")] == [32, False]
    for name in ("_rms_norm_kernel", "_kv_cache_write_kernel"):
        assert len({keys[name] for keys in per_batch.values()}) == 1, name


def test_prefill_steps_compile_one_attention_variant(recorders):
    layer = Layer(max_batch=256, max_num_tokens=5000, max_model_len=8192)
    keys = set()
    for num_tokens in TOKEN_COUNTS:
        for batch in {1, 2, 3, 17, min(200, num_tokens - 1)} - {0}:
            if batch >= num_tokens:
                continue
            q_lens = [num_tokens // batch + (i < num_tokens % batch) for i in range(batch)]
            keys.add(keys_of(recorders, lambda: layer.step(q_lens))["_prefill_kernel"])
    assert len(keys) == 1


@pytest.mark.parametrize("kernel,threshold", [("_rms_norm_kernel", cinfer_ops.MANY_ROWS),
                                              ("_kv_cache_write_kernel", cinfer_ops.MANY_TOKENS)])
def test_token_count_variants_change_only_at_their_threshold(recorders, kernel, threshold):
    layer = Layer(max_batch=256, max_num_tokens=5000, max_model_len=8192)
    per_count = {n: keys_of(recorders, lambda: layer.step([n]))[kernel] for n in TOKEN_COUNTS}
    few, many = per_count[threshold - 1], per_count[threshold]
    assert few != many
    assert all(keys == (few if n < threshold else many) for n, keys in per_count.items())


@pytest.mark.parametrize("max_num_seqs,max_num_batched_tokens,max_model_len,graphs", [
    (256, 8192, 8192, True),    # the defaults, CUDA graphs
    (256, 8192, 8192, False),   # eager decode
    (16, 32, 512, True),        # a small step budget: no step ever reaches the many-tokens variants
    (8, 2048, 300, False),      # short sequences: the warm-up's large step needs several of them
    (3, 600, 200, False),       # the largest step (3 sequences of 200) stays below the thresholds
])
def test_warm_up_steps_reach_every_serving_variant(recorders, max_num_seqs, max_num_batched_tokens, max_model_len,
                                                   graphs):
    # The runner's warm-up steps (as on a GPU) must produce every compile key that a step the scheduler can
    # form produces: decode steps of any batch (padded to a bucket under CUDA graphs), prefill and mixed steps of
    # any token count within the budget, each sequence within max_model_len.
    max_batch = max(decode_buckets(max_num_seqs)[-1] if graphs else max_num_seqs, 2)
    max_num_tokens = max(max_num_batched_tokens, max_batch)
    layer = Layer(max_batch, max_num_tokens, max_model_len)
    decode_batches = decode_variant_batches(max_batch, Layer.kv_heads, Layer.head_dim, torch.device("cpu"))
    warm = union([keys_of(recorders, lambda: layer.step(q_lens))
                  for q_lens in warm_up_steps(max_batch, max_num_tokens, max_model_len, all_variants=True,
                                              decode_batches=decode_batches)])
    batches = decode_buckets(max_num_seqs) if graphs else range(1, max_num_seqs + 1)
    serving = [[1] * b for b in batches]
    if graphs:  # prefill steps padded to a graph's shape (cinfer_runtime.cuda_graphs)
        for t in prefill_buckets(max_num_tokens):
            b = min(t, max_batch)
            serving.append([t // b + (i < t % b) for i in range(b)])
    for num_tokens in [n for n in TOKEN_COUNTS if n <= max_num_batched_tokens] + [max_num_batched_tokens]:
        for batch in {1, 2, 3, 5, 8, 17, 64, max_num_seqs}:
            if batch <= min(num_tokens, max_num_seqs) and batch * max_model_len >= num_tokens:
                rest = num_tokens - (batch - 1)  # batch - 1 decodes and one prompt chunk
                serving.append([1] * (batch - 1) + [rest] if rest <= max_model_len else
                               [num_tokens // batch + (i < num_tokens % batch) for i in range(batch)])
    for q_lens in serving:
        assert sum(q_lens) <= max_num_tokens and len(q_lens) <= max_batch and max(q_lens) <= max_model_len
        for name, keys in keys_of(recorders, lambda: layer.step(q_lens)).items():
            assert keys <= warm.get(name, frozenset()), (
                f"{name}: a step of {len(q_lens)} sequences, {sum(q_lens)} tokens compiles a variant the warm-up "
                f"did not")


def test_warm_up_steps():
    # On CPU the ops run their reference implementations: no kernel variants to warm, so no extra steps.
    assert warm_up_steps(256, 8192, 8192, all_variants=False) == [[3, 2], [1, 1]]
    steps = warm_up_steps(256, 8192, 300, all_variants=True)
    assert steps[:3] == [[3, 2], [1, 1], [1] * 256]
    big = steps[3]
    assert sum(big) == max(cinfer_ops.VARIANT_TOKEN_THRESHOLDS) and max(big) <= 300
    # a decode step at each batch decode_variant_batches names, below max_batch
    assert warm_up_steps(64, 8192, 300, all_variants=True, decode_batches=[1, 50, 80])[3] == [1] * 50
    assert (warm_up_steps(40, 8192, 300, all_variants=True, decode_batches=[1, 50])
            == warm_up_steps(40, 8192, 300, all_variants=True))  # none past max_batch
