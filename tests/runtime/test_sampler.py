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
from cinfer_runtime.sampler import (Sampler, SamplingRow, gumbel_argmax_torch, gumbel_argmax_triton, row_keys,
                                    uniforms)
from cinfer_runtime.sampling_params import SamplingParams
from tests.kernel_keys import Recorder

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else ["cpu"]
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


@pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton needs a GPU or the interpreter")
def test_triton_kernel_matches_torch_path():
    device = "cuda" if HAS_CUDA else "cpu"
    gen = torch.Generator().manual_seed(0)
    batch, vocab_size = 12, 2500  # > one 1024-wide block, with a ragged tail
    logits = (torch.randn(batch, vocab_size, generator=gen) * 3).to(device)
    logits[torch.rand(batch, vocab_size, generator=gen).to(device) < 0.3] = -math.inf
    seeds = torch.randint(-2 ** 63, 2 ** 63 - 1, (batch,), generator=gen).to(device)
    steps = torch.randint(0, 10 ** 6, (batch,), generator=gen).to(device)
    want = gumbel_argmax_torch(logits, row_keys(seeds, steps))
    got = gumbel_argmax_triton(logits, seeds, steps)
    assert got.dtype == torch.int64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.isfinite(logits.gather(1, got[:, None])).all()


def test_triton_kernel_compiles_one_variant_for_any_batch(monkeypatch):
    # Triton compiles a variant per pointer alignment (tests/kernel_keys.py): the seeds/steps rows the sampler
    # uploads must start 16-byte aligned whatever the batch, or a sampled step of a new batch parity would compile
    # while serving. The kernel is only recorded, not run.
    recorder = Recorder("_gumbel_argmax_kernel", sampler_module._gumbel_argmax_kernel)
    monkeypatch.setattr(sampler_module, "_gumbel_argmax_kernel", recorder)
    sampler = Sampler(64, "cpu", 16)
    monkeypatch.setattr(sampler, "_use_triton", True)
    for batch in range(1, 10):
        params = [SamplingParams(temperature=0.7, top_k=5 if i % 2 else -1) if i % 3 else SamplingParams(temperature=0)
                  for i in range(batch)]
        params[0] = SamplingParams(temperature=1.0, top_p=0.9)
        sampler(torch.randn(batch, 64), rows_for(params, seeds=list(range(batch))))
    assert len(recorder.keys) == 1


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
