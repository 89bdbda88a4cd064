"""Sampler: greedy = argmax, repetition penalty = HF's processor, sampled distributions = HF's warpers' filtered
softmax (checked statistically), and seeded draws that do not depend on the rest of the batch."""
import math
import os

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

import cinfer_runtime.sampler as sampler_module
from cinfer_runtime.sampler import (PARTIALS_BLOCK, SPLIT_BLOCK, Sampler, SamplingRow, argmax_triton,
                                    gumbel_argmax_torch, gumbel_argmax_triton, row_keys, split_for, uniforms)
from cinfer_runtime.sampling_params import SamplingParams
from tests.kernel_keys import Recorder

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else ["cpu"]
# The Triton kernels run natively on a GPU, through the interpreter on CPU (tests/conftest.py sets it).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton needs a GPU or the interpreter")
MASK64 = (1 << 64) - 1


def rows_for(params_list, seeds, steps=None, token_ids=None):
    steps = steps if steps is not None else [0] * len(params_list)
    token_ids = token_ids if token_ids is not None else [[]] * len(params_list)
    return [SamplingRow(params=p, seed=s, step=t, token_ids=list(ids))
            for p, s, t, ids in zip(params_list, seeds, steps, token_ids)]


# ---- the counter-based generator --------------------------------------------------------------------------------

def py_mix64(z: int) -> int:
    """splitmix64's finaliser on Python ints (the reference for the int64 tensor arithmetic)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def py_uniforms(seed: int, step: int, vocab_size: int) -> list[float]:
    key = py_mix64(py_mix64(seed & MASK64) ^ step)
    return [((py_mix64((key + (i + 1) * 0x9E3779B97F4A7C15) & MASK64) >> 41) + 0.5) / 2 ** 23
            for i in range(vocab_size)]


def test_py_mix64_is_splitmix64():
    # The first two outputs of the splitmix64 generator seeded with 0 (the published test vector).
    gamma = 0x9E3779B97F4A7C15
    assert py_mix64(gamma) == 0xE220A8397B1DCDAF
    assert py_mix64((2 * gamma) & MASK64) == 0x6E789E6AA1B965F4


@pytest.mark.parametrize("device", DEVICES)
def test_uniforms_match_python_reference_bit_for_bit(device):
    seeds = [0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 123456789123, -987654321987]
    steps = [0, 5, 1, 2 ** 40, 17, 999, 3]
    vocab_size = 37
    keys = row_keys(torch.tensor([s if s < 2 ** 63 else s - 2 ** 64 for s in seeds], device=device),
                    torch.tensor(steps, device=device))
    got = uniforms(keys, vocab_size).cpu()
    want = torch.tensor([py_uniforms(s, t, vocab_size) for s, t in zip(seeds, steps)], dtype=torch.float32)
    assert torch.equal(got, want)
    assert got.min() > 0 and got.max() < 1


# ---- the split argmax kernels ------------------------------------------------------------------------------------

def planted_logits(batch: int, vocab_size: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 [batch, vocab_size], exact in bf16 and fp16: small random integers (ties everywhere), and in each row one
    planted case, cycling through: the maximum tied on both sides of every block boundary from a random one on
    (chunk boundaries are block boundaries), NaNs after a +inf, all -inf, -inf but one number, +inf ties, signed
    zeros (-0.0 first) as the maximum of negative numbers."""
    x = torch.randint(-8, 8, (batch, vocab_size), generator=gen).float()

    def positions(n: int) -> list[int]:
        return torch.randint(vocab_size, (n,), generator=gen).tolist()

    for row in range(batch):
        r = x[row]
        case = row % 6
        if case == 0:
            first = positions(1)[0]
            r[first] = 100.0
            for boundary in range(block * (first // block + 1), vocab_size, block):
                r[boundary - 1:boundary + 1] = 100.0
        elif case == 1:
            r[positions(1)] = math.inf
            r[positions(2)] = math.nan
        elif case == 2:
            r[:] = -math.inf
        elif case == 3:
            r[:] = -math.inf
            r[positions(1)] = -5.0
        elif case == 4:
            r[positions(3)] = math.inf
        else:
            r[:] = -r.abs() - 1
            zeros = sorted(set(positions(3)))
            r[zeros] = 0.0
            r[zeros[0]] = -0.0
    return x


def strided(x: torch.Tensor) -> torch.Tensor:
    """x as a view with row stride vocab + 5 into a NaN-poisoned buffer (nothing outside the view may be read)."""
    buffer = torch.full((x.shape[0], x.shape[1] + 5), math.nan, dtype=x.dtype, device=x.device)
    buffer[:, 2:2 + x.shape[1]] = x
    return buffer[:, 2:2 + x.shape[1]]


def test_split_rule():
    vocab_size, num_sms = 128256, 132  # Llama 3 on an H100
    for batch in [1, 2, 3, 4, 8, 16, 64, 100, 256, 264, 512]:
        num_chunks, chunk_size = split_for(batch, vocab_size, num_sms)
        assert chunk_size % SPLIT_BLOCK == 0
        assert (num_chunks - 1) * chunk_size < vocab_size <= num_chunks * chunk_size  # no empty chunk
        assert num_chunks == 1 or batch * num_chunks <= 4 * num_sms  # large batches are not over-split
        if batch <= 2:
            assert 100 <= batch * num_chunks <= 300
    assert split_for(264, vocab_size, num_sms)[0] == 1
    assert split_for(1, 1000, num_sms) == (1, SPLIT_BLOCK)  # never more chunks than blocks
    assert split_for(1, 1, num_sms) == (1, SPLIT_BLOCK)


# (block, num_chunks): the production block and rule, fine blocks by the rule, forced splits into many chunks.
ARGMAX_SPLITS = [(SPLIT_BLOCK, None), (16, None), (16, 7), (8, 40)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("block,num_chunks", ARGMAX_SPLITS)
def test_argmax_triton_matches_torch(dtype, layout, block, num_chunks):
    gen = torch.Generator().manual_seed(block + (num_chunks or 0))
    batch, vocab_size = (9, 2500) if block == SPLIT_BLOCK else (7, 333)
    logits = planted_logits(batch, vocab_size, block, gen).to(TRITON_DEVICE, dtype)
    if layout == "strided":
        logits = strided(logits)
    got = argmax_triton(logits, num_chunks=num_chunks, block=block)
    assert got.dtype == torch.int64 and got.shape == (batch,)
    assert torch.equal(got, logits.argmax(dim=-1))


@needs_triton
@pytest.mark.parametrize("vocab_size", [1, 2, 3, 17])
def test_argmax_triton_tiny_vocabularies(vocab_size):
    gen = torch.Generator().manual_seed(vocab_size)
    logits = planted_logits(6, vocab_size, 2, gen).to(TRITON_DEVICE)
    for block, num_chunks in [(SPLIT_BLOCK, None), (2, 100)]:
        assert torch.equal(argmax_triton(logits, num_chunks=num_chunks, block=block), logits.argmax(dim=-1))


@needs_triton
def test_argmax_triton_more_chunks_than_one_reduction_block():
    """Over PARTIALS_BLOCK chunks a row: the reduction kernel loops; also rows broadcast with row stride 0."""
    gen = torch.Generator().manual_seed(6)
    block, vocab_size = 8, 8 * PARTIALS_BLOCK + 20
    x = torch.randint(-8, 8, (2, vocab_size), generator=gen).float()
    x[0, [-12, -3]] = 100.0  # the maximum only in chunks past the first PARTIALS_BLOCK, tied
    x[1, 5], x[1, [-9, -1]] = math.inf, math.nan  # likewise the first NaN
    logits = strided(x.to(TRITON_DEVICE, torch.bfloat16))
    got = argmax_triton(logits, num_chunks=10 ** 6, block=block)
    assert torch.equal(got, logits.argmax(dim=-1)) and got.tolist() == [vocab_size - 12, vocab_size - 9]
    row = planted_logits(1, 300, 16, gen).to(TRITON_DEVICE)
    assert torch.equal(argmax_triton(row.expand(4, 300), block=16), row.argmax(dim=-1).expand(4))
    assert argmax_triton(row[:0]).shape == (0,)


def test_argmax_triton_rejects_bad_logits():
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        argmax_triton(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="vocab size"):
        argmax_triton(torch.zeros(2, 0))


def gumbel_inputs(batch: int, vocab_size: int, block: int, gen: torch.Generator):
    """fp32 logits with 30% -inf and the planted cases of planted_logits in every other row (all -inf, +inf ties
    across block boundaries, NaNs), and random seeds and steps, on TRITON_DEVICE."""
    logits = torch.randn(batch, vocab_size, generator=gen) * 3
    logits[torch.rand(batch, vocab_size, generator=gen) < 0.3] = -math.inf
    logits[1::2] = planted_logits(batch, vocab_size, block, gen)[1::2]
    seeds = torch.randint(-2 ** 63, 2 ** 63 - 1, (batch,), generator=gen)
    steps = torch.randint(0, 10 ** 6, (batch,), generator=gen)
    return logits.to(TRITON_DEVICE), seeds.to(TRITON_DEVICE), steps.to(TRITON_DEVICE)


@needs_triton
def test_gumbel_argmax_triton_matches_torch_whatever_the_split():
    """Exactly gumbel_argmax_torch (first occurrence on ties, NaN wins), and the same tokens for every split:
    one chunk a row is the single-program kernel this replaced."""
    gen = torch.Generator().manual_seed(7)
    logits, seeds, steps = gumbel_inputs(12, 2500, 16, gen)  # > one 1024-wide block, with a ragged tail
    want = gumbel_argmax_torch(logits, row_keys(seeds, steps))
    for num_chunks in [None, 1]:
        got = gumbel_argmax_triton(logits, seeds, steps, num_chunks=num_chunks)
        assert got.dtype == torch.int64
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    logits, seeds, steps = gumbel_inputs(4, 600, 16, gen)
    want = gumbel_argmax_torch(logits, row_keys(seeds, steps))
    for block, num_chunks in [(16, None), (16, 1), (16, 25)]:
        torch.testing.assert_close(gumbel_argmax_triton(logits, seeds, steps, num_chunks=num_chunks, block=block),
                                   want, rtol=0, atol=0)
    assert torch.isfinite(logits[0::2].gather(1, want[0::2, None])).all()  # the unplanted rows draw kept tokens


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_uses_the_split_kernels(dtype):
    """The sampler's CUDA path (forced on here, through the interpreter on CPU): greedy, penalised and mixed rows."""
    gen = torch.Generator().manual_seed(8)
    batch, vocab_size = 6, 300
    logits = planted_logits(batch, vocab_size, 16, gen).to(TRITON_DEVICE, dtype)
    sampler = Sampler(vocab_size, torch.device(TRITON_DEVICE))
    sampler._use_triton = True
    want = logits.argmax(dim=-1)
    greedy = SamplingParams(temperature=0.0)
    assert torch.equal(sampler(logits, rows_for([greedy] * batch, seeds=range(batch))), want)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.0 + 1e-6)
    assert torch.equal(sampler(logits, rows_for([penalised] * batch, seeds=range(batch))), want)
    mixed = [greedy if i % 2 else SamplingParams(temperature=0.8) for i in range(batch)]
    assert torch.equal(sampler(logits, rows_for(mixed, seeds=range(batch)))[1::2], want[1::2])


@pytest.mark.gpu
def test_split_argmax_at_llama3_shapes_without_host_sync():
    gen = torch.Generator().manual_seed(9)
    vocab_size = 128256
    sampler = Sampler(vocab_size, torch.device("cuda"), max_num_seqs=512)
    greedy = SamplingParams(temperature=0.0)
    for batch in [1, 2, 8, 300]:
        for dtype in [torch.bfloat16, torch.float16, torch.float32]:
            logits = planted_logits(batch, vocab_size, SPLIT_BLOCK, gen).to("cuda", dtype)
            want = logits.argmax(dim=-1)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = sampler(logits, rows_for([greedy] * batch, seeds=range(batch)))
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(got, want), (batch, dtype)


def test_triton_kernel_compiles_one_variant_for_any_batch(monkeypatch):
    # Triton compiles a variant per pointer alignment (tests/kernel_keys.py): the seeds/steps rows the sampler
    # uploads must start 16-byte aligned whatever the batch, or a sampled step of a new batch parity would compile
    # while serving. The kernel is only recorded, not run.
    recorder = Recorder("_chunk_argmax_kernel", sampler_module._chunk_argmax_kernel)
    monkeypatch.setattr(sampler_module, "_chunk_argmax_kernel", recorder)
    # Nothing launches: the CPU tensors here could not reach a real GPU kernel.
    monkeypatch.setattr(sampler_module, "_reduce_partials_kernel",
                        Recorder("_reduce_partials_kernel", sampler_module._reduce_partials_kernel))
    sampler = Sampler(64, "cpu", 16)
    monkeypatch.setattr(sampler, "_use_triton", True)
    for batch in range(1, 10):
        params = [SamplingParams(temperature=0.7, top_k=5 if i % 2 else -1) if i % 3 else SamplingParams(temperature=0)
                  for i in range(batch)]
        params[0] = SamplingParams(temperature=1.0, top_p=0.9)
        sampler(torch.randn(batch, 64), rows_for(params, seeds=list(range(batch))))
    assert len(recorder.keys) == 2  # the gumbel variant (sampled rows) and the plain one (the greedy rows' argmax)


# ---- greedy and repetition penalty --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(device, dtype):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 300, generator=gen).to(device, dtype)
    sampler = Sampler(300, torch.device(device))
    greedy = SamplingParams(temperature=0.0, top_k=3, top_p=0.1, min_p=0.5)  # filters are ignored when greedy
    out = sampler(logits, rows_for([greedy] * 9, seeds=range(9)))
    assert out.dtype == torch.int64 and out.device.type == device and out.shape == (9,)
    assert torch.equal(out.cpu(), logits.float().argmax(-1).cpu())
    # Greedy rows among sampling rows (the mixed path) still take the argmax.
    mixed = [greedy if i % 2 else SamplingParams(temperature=1.5, top_k=50) for i in range(9)]
    out = sampler(logits, rows_for(mixed, seeds=range(9))).cpu()
    assert torch.equal(out[1::2], logits.float().argmax(-1).cpu()[1::2])


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2 ** 32 - 1), penalty=st.floats(0.2, 5.0), length=st.integers(1, 40))
def test_repetition_penalty_matches_hf(device, seed, penalty, length):
    batch, vocab_size = 5, 50
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab_size, generator=gen) * 4
    token_ids = torch.randint(0, vocab_size, (batch, length), generator=gen)  # repeats included
    want = RepetitionPenaltyLogitsProcessor(penalty)(token_ids, logits.clone())
    sampler = Sampler(vocab_size, torch.device(device))
    rows = rows_for([SamplingParams(temperature=0, repetition_penalty=penalty)] * batch, seeds=range(batch),
                    token_ids=token_ids.tolist())
    got = sampler._apply_repetition_penalty(logits.clone().to(device), rows, list(range(batch)))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    # End to end, a greedy request takes the argmax of the penalised logits.
    assert torch.equal(sampler(logits.to(device), rows).cpu(), want.argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_only_on_its_rows(device):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 20, generator=gen)
    sampler = Sampler(20, torch.device(device))
    params = [SamplingParams(temperature=0, repetition_penalty=1.0), SamplingParams(temperature=0, repetition_penalty=3.0),
              SamplingParams(temperature=0, repetition_penalty=1.0)]
    ids = [list(range(20))] * 3
    got = sampler._apply_repetition_penalty(logits.clone().to(device), rows_for(params, [0, 1, 2], token_ids=ids),
                                           [1]).cpu()
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    assert torch.equal(got[1], torch.where(logits[1] > 0, logits[1] / 3.0, logits[1] * 3.0))


# ---- sampled distributions ---------------------------------------------------------------------------------------

LOGITS8 = [1.3, -0.4, 2.1, 0.2, -1.7, 0.9, 1.75, -0.1]
PROMPT8 = [0, 2, 2, 4]  # for the repetition-penalty configs: one positive, one negative, one repeated logit


def hf_filtered_probs(logits: torch.Tensor, p: SamplingParams, token_ids: list[int]) -> torch.Tensor:
    """The distribution HF generate samples from, in float64: its processors in its order, then softmax."""
    x = logits.double()[None]
    ids = torch.tensor([token_ids], dtype=torch.long)
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k != -1:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x.softmax(-1)[0]


def count_bound(n: int, prob: float, log_inv_delta: float = 30.0) -> float:
    """Bernstein: P(|count - n*prob| >= t) <= 2 exp(-t^2 / (2 (n prob (1-prob) + t/3))). This t makes the right-hand
    side <= 2e-13 per token: a correct sampler fails the test with probability ~1e-11 over all configs."""
    var = n * prob * (1 - prob)
    return math.sqrt(2 * var * log_inv_delta) + 2 * log_inv_delta / 3


def assert_counts_match(counts: torch.Tensor, probs: torch.Tensor, n: int, what: str) -> None:
    for tok, (c, p) in enumerate(zip(counts.tolist(), probs.tolist())):
        if p == 0:
            assert c == 0, f"{what}: token {tok} is filtered out but was drawn {c} times"
        else:
            assert abs(c - n * p) <= count_bound(n, p), f"{what}: token {tok} drawn {c} times, expected {n * p:.1f}"


DIST_CONFIGS = [
    SamplingParams(),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.8),
    SamplingParams(top_k=3),
    SamplingParams(top_k=1, temperature=3.0),
    SamplingParams(top_p=0.7),
    SamplingParams(top_p=0.5, temperature=0.5),
    SamplingParams(min_p=0.2),
    SamplingParams(min_p=0.05, temperature=2.5),
    SamplingParams(temperature=1.3, top_k=6, top_p=0.9, min_p=0.1),
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(repetition_penalty=0.6, temperature=0.8, top_k=4),
]
N_DRAWS = 60_000


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vary", ["seed", "step"])
@pytest.mark.parametrize("params", DIST_CONFIGS, ids=[repr(p) for p in DIST_CONFIGS])
def test_sampled_distribution_matches_hf_warpers(device, vary, params):
    logits = torch.tensor(LOGITS8)
    probs = hf_filtered_probs(logits, params, PROMPT8)
    # The filters' boundaries are far from these logits, so fp32 and fp64 agree on the kept set.
    if params.top_p < 1:
        sorted_probs = hf_filtered_probs(logits, SamplingParams(temperature=params.temperature, top_k=params.top_k,
                                                                repetition_penalty=params.repetition_penalty),
                                         PROMPT8).sort(descending=True).values
        assert (sorted_probs.cumsum(0) - params.top_p).abs().min() > 1e-3
    if params.min_p > 0:
        before_min_p = hf_filtered_probs(logits, SamplingParams(**{**vars(params), "min_p": 0.0}), PROMPT8)
        assert (before_min_p / before_min_p.max() - params.min_p).abs().min() > 1e-3
    sampler = Sampler(8, torch.device(device), max_num_seqs=N_DRAWS)
    if vary == "seed":
        rows = rows_for([params] * N_DRAWS, seeds=range(N_DRAWS), steps=[3] * N_DRAWS, token_ids=[PROMPT8] * N_DRAWS)
    else:
        rows = rows_for([params] * N_DRAWS, seeds=[42] * N_DRAWS, steps=range(N_DRAWS), token_ids=[PROMPT8] * N_DRAWS)
    tokens = sampler(logits.expand(N_DRAWS, 8).to(device), rows).cpu()
    assert_counts_match(torch.bincount(tokens, minlength=8), probs, N_DRAWS, repr(params))


def test_count_check_rejects_slightly_wrong_distributions():
    """The statistical check has teeth: exact expected counts of a nearby wrong distribution fail it."""
    logits = torch.tensor(LOGITS8)
    for right, wrong in [(SamplingParams(temperature=1.0), SamplingParams(temperature=1.1)),
                         (SamplingParams(top_k=3), SamplingParams(top_k=4)),
                         (SamplingParams(top_p=0.7), SamplingParams(top_p=0.85)),
                         (SamplingParams(min_p=0.2), SamplingParams(min_p=0.14)),
                         (SamplingParams(repetition_penalty=1.8), SamplingParams(repetition_penalty=1.6))]:
        counts = (hf_filtered_probs(logits, wrong, PROMPT8) * N_DRAWS).round().long()
        with pytest.raises(AssertionError):
            assert_counts_match(counts, hf_filtered_probs(logits, right, PROMPT8), N_DRAWS, "")


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
    top_k=st.sampled_from([-1, 1, 2, 5, 100]),
    top_p=st.sampled_from([1.0, 0.95, 0.6, 0.2, 0.01]),
    min_p=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.7]),
)


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2 ** 32 - 1), vocab_size=st.integers(2, 64), params=params_strategy)
def test_only_kept_tokens_are_drawn(device, seed, vocab_size, params):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab_size, generator=gen) * 2
    prompt = torch.randint(0, vocab_size, (6,), generator=gen).tolist()
    n = 256
    if params.greedy:
        want_kept = torch.zeros(vocab_size, dtype=torch.bool)
        want_kept[hf_filtered_probs(logits, SamplingParams(repetition_penalty=params.repetition_penalty),
                                    prompt).argmax()] = True
    else:
        probs = hf_filtered_probs(logits, params, prompt)
        want_kept = probs > 0
        # Skip the (measure-zero in exact arithmetic) cases where fp32 may legitimately draw the boundary differently.
        unfiltered = hf_filtered_probs(logits, SamplingParams(temperature=params.temperature,
                                                              repetition_penalty=params.repetition_penalty), prompt)
        cums = unfiltered.sort(descending=True).values.cumsum(0)
        assume(params.top_p == 1 or (cums - params.top_p).abs().min() > 1e-5)
        assume(params.min_p == 0 or (unfiltered / unfiltered.max() - params.min_p).abs().min() > 1e-5)
    sampler = Sampler(vocab_size, torch.device(device))
    rows = rows_for([params] * n, seeds=[seed] * n, steps=range(n), token_ids=[prompt] * n)
    tokens = sampler(logits.expand(n, vocab_size).to(device), rows).cpu()
    assert want_kept[tokens].all(), f"drew filtered tokens {sorted(set(tokens[~want_kept[tokens]].tolist()))}"
    if want_kept.sum() == 1:
        assert (tokens == want_kept.nonzero()[0, 0]).all()


# ---- reproducibility -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_seeded_tokens_do_not_depend_on_the_batch(device):
    vocab_size = 97
    gen = torch.Generator().manual_seed(3)
    configs = [SamplingParams(), SamplingParams(temperature=0.7, top_k=10), SamplingParams(top_p=0.8),
               SamplingParams(min_p=0.1, temperature=1.5), SamplingParams(repetition_penalty=1.2, top_p=0.9),
               SamplingParams(temperature=0)]
    n_targets = 30
    targets = [(configs[i % len(configs)], torch.randn(vocab_size, generator=gen),
                int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), generator=gen)), i * 7,
                torch.randint(0, vocab_size, (5,), generator=gen).tolist()) for i in range(n_targets)]
    sampler = Sampler(vocab_size, torch.device(device))
    alone = []
    for params, logits, seed, step, ids in targets:
        rows = rows_for([params], [seed], [step], [ids])
        alone.append(int(sampler(logits[None].to(device), rows)[0]))
    for trial in range(3):
        # Shuffle the targets among filler rows of every kind, with different logits, seeds and steps.
        n_fill = 20 + 15 * trial
        fill = [(configs[int(torch.randint(len(configs), (), generator=gen))],
                 torch.randn(vocab_size, generator=gen) * 3, trial * 1000 + j, j, [j % vocab_size])
                for j in range(n_fill)]
        everything = [(t, k) for k, t in enumerate(targets)] + [(f, None) for f in fill]
        order = torch.randperm(len(everything), generator=gen).tolist()
        batch = [everything[i] for i in order]
        rows = rows_for([b[0][0] for b in batch], [b[0][2] for b in batch], [b[0][3] for b in batch],
                        [b[0][4] for b in batch])
        logits = torch.stack([b[0][1] for b in batch]).to(device)
        out = sampler(logits, rows).tolist()
        for pos, (_, k) in enumerate(batch):
            if k is not None:
                assert out[pos] == alone[k], f"target {k} at position {pos} drew {out[pos]}, alone {alone[k]}"


@pytest.mark.parametrize("device", DEVICES)
def test_seeds_and_steps_drive_the_draws(device):
    vocab_size, n_steps = 1000, 12
    logits = torch.zeros(8, vocab_size, device=device)  # uniform: every draw is fresh randomness
    sampler = Sampler(vocab_size, torch.device(device))
    params = [SamplingParams()] * 8
    seqs = [sampler(logits, rows_for(params, seeds=range(8), steps=[t] * 8)).tolist() for t in range(n_steps)]
    per_seed = {tuple(s[i] for s in seqs) for i in range(8)}
    assert len(per_seed) == 8, "different seeds gave the same sequence"
    assert all(len(set(seq)) > n_steps // 2 for seq in per_seed), "steps do not change the draws"
    again = [sampler(logits, rows_for(params, seeds=range(8), steps=[t] * 8)).tolist() for t in range(n_steps)]
    assert again == seqs
    # Seeds are used mod 2**64.
    wrapped = sampler(logits, rows_for(params, seeds=[s + 2 ** 64 for s in range(8)], steps=[0] * 8)).tolist()
    assert wrapped == seqs[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_sample_as_fp32(device, dtype):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 64, generator=gen).to(device, dtype)
    sampler = Sampler(64, torch.device(device))
    rows = rows_for([SamplingParams(top_k=5, temperature=0.9)] * 16, seeds=range(16))
    assert torch.equal(sampler(logits, rows), sampler(logits.float(), rows))


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_temperatures(device):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 40, generator=gen).to(device)
    sampler = Sampler(40, torch.device(device))
    cold = sampler(logits, rows_for([SamplingParams(temperature=1e-30)] * 6, seeds=range(6)))
    assert torch.equal(cold, logits.argmax(-1))  # no overflow to inf/NaN: tiny temperature is argmax
    sampler = Sampler(40, torch.device(device), max_num_seqs=4000)
    hot = sampler(logits[:1].expand(4000, 40),
                  rows_for([SamplingParams(temperature=1e6)] * 4000, seeds=range(4000)))
    assert len(set(hot.tolist())) == 40  # essentially uniform


def test_bad_input_raises():
    sampler = Sampler(10, torch.device("cpu"), max_num_seqs=2)
    rows = rows_for([SamplingParams()] * 2, seeds=[0, 1])
    with pytest.raises(ValueError, match="vocab_size"):
        sampler(torch.randn(2, 11), rows)
    with pytest.raises(ValueError, match="rows"):
        sampler(torch.randn(3, 10), rows)
    with pytest.raises(ValueError, match="max_num_seqs"):
        sampler(torch.randn(3, 10), rows_for([SamplingParams()] * 3, seeds=[0, 1, 2]))
    assert sampler(torch.randn(0, 10), []).shape == (0,)
