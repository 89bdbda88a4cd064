"""Scheduler properties, driven by a pure-Python stand-in for the model that reads its context from a simulated
paged KV cache through the scheduler's block tables. A wrong block table, a freed block still in use or a wrong
resume point after preemption therefore changes the stand-in's output, not just an internal counter."""
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from cinfer_runtime.block_manager import BlockManager
from cinfer_runtime.config import EngineConfig
from cinfer_runtime.sampling_params import SamplingParams
from cinfer_runtime.scheduler import Scheduler
from cinfer_runtime.sequence import Sequence

VOCAB = 50
STOP_TOKEN = 0


def next_token(context: list[int]) -> int:
    """The stand-in model: a deterministic function of the whole context (like greedy decoding)."""
    h = len(context)
    for i, t in enumerate(context):
        h = (h * 1_000_003 + (i + 1) * (t + 7)) % 2_147_483_647
    return h % VOCAB


def reference_output(prompt: list[int], max_tokens: int, max_model_len: int) -> tuple[list[int], str]:
    tokens = list(prompt)
    while True:
        t = next_token(tokens)
        tokens.append(t)
        if t == STOP_TOKEN:
            return tokens[len(prompt):], "stop"
        if len(tokens) - len(prompt) >= max_tokens or len(tokens) >= max_model_len:
            return tokens[len(prompt):], "length"


@dataclass
class Trace:
    outputs: dict[int, tuple[list[int], str]]
    first_scheduled: list[int]       # seq ids in the order they were first scheduled
    num_preemptions: int
    num_steps: int


def simulate(requests, *, num_blocks, block_size=8, max_num_seqs=4, max_num_batched_tokens=16,
             enable_chunked_prefill=True, max_model_len=64) -> Trace:
    """requests: list of (arrival_step, prompt, max_tokens). Runs schedule -> stand-in model -> update to the end,
    checking the per-step properties on the way."""
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                          enable_chunked_prefill=enable_chunked_prefill).resolve(max_model_len)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(config, bm)
    cache: dict[int, tuple[int, int, int]] = {}      # slot -> (seq_id, position, token)
    seqs = []
    first_scheduled: list[int] = []
    pending = sorted(enumerate(requests), key=lambda r: r[1][0])
    total_tokens = sum(len(p) + m for _, p, m in requests)
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, max_tokens) = pending.pop(0)
            seq = Sequence(seq_id=i, request_id=str(i), prompt_token_ids=prompt,
                           params=SamplingParams(max_tokens=max_tokens, temperature=0.0), seed=0,
                           stop_token_ids=frozenset({STOP_TOKEN}))
            seqs.append(seq)
            sched.add(seq)
        out = sched.schedule()
        assert out.num_batched_tokens <= config.max_num_batched_tokens
        assert len(out.seqs) <= config.max_num_seqs and len(sched.running) <= config.max_num_seqs
        assert len({s.seq_id for s in out.seqs}) == len(out.seqs)
        assert not set(map(id, out.preempted)) & set(map(id, out.seqs)), "a preempted request was scheduled"
        if sched.has_unfinished():
            assert out.seqs, "unfinished requests but nothing scheduled: deadlock"
        if not enable_chunked_prefill:
            for s, n in zip(out.seqs, out.num_new_tokens):
                assert s.num_computed_tokens + n == s.num_tokens, "a prefill was chunked with chunking off"
        for s in out.seqs:
            if s.seq_id not in first_scheduled:
                first_scheduled.append(s.seq_id)
        sampled = []
        for s, n, table, samples in zip(out.seqs, out.num_new_tokens, out.block_tables, out.samples):
            assert n >= 1
            start = s.num_computed_tokens
            for pos in range(start, start + n):
                slot = table[pos // block_size] * block_size + pos % block_size
                cache[slot] = (s.seq_id, pos, s.token_ids[pos])
            if samples:
                context = []
                for pos in range(start + n):
                    slot = table[pos // block_size] * block_size + pos % block_size
                    owner, cached_pos, token = cache[slot]
                    assert (owner, cached_pos) == (s.seq_id, pos), "context read from a slot another token owns"
                    context.append(token)
                sampled.append(next_token(context))
        sched.update(out, sampled)
        step += 1
        assert step <= 4 * total_tokens + 100, "requests starved"
    assert bm.num_free_blocks == num_blocks and not bm.block_tables, "blocks leaked"
    outputs = {s.seq_id: (s.output_token_ids, s.finish_reason) for s in seqs}
    return Trace(outputs, first_scheduled, sum(s.num_preemptions for s in seqs), step)


REQUESTS = st.lists(
    st.tuples(st.integers(0, 6), st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=30), st.integers(1, 24)),
    min_size=1, max_size=8)


@given(requests=REQUESTS, num_blocks=st.integers(7, 24), chunked=st.booleans(),
       budget=st.integers(4, 40), max_num_seqs=st.integers(1, 5))
def test_outputs_budget_fcfs_and_no_starvation(requests, num_blocks, chunked, budget, max_num_seqs):
    # The engine only admits requests whose whole length fits the cache (7 blocks of 8 = 56 >= 30 + 24 here).
    max_model_len = 56
    if not chunked:
        budget = max(budget, max_model_len)
    trace = simulate(requests, num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     enable_chunked_prefill=chunked, max_model_len=max_model_len)
    for i, (_, prompt, max_tokens) in enumerate(requests):
        assert trace.outputs[i] == reference_output(prompt, max_tokens, max_model_len), f"request {i}"
    # FCFS: requests are first scheduled in arrival order (ties in arrival step broken by request index).
    order = sorted(range(len(requests)), key=lambda i: (requests[i][0], i))
    assert trace.first_scheduled == order


def test_heavy_preemption_keeps_outputs():
    # 8 requests of up to 40 tokens each over a cache of 6 blocks x 8 slots: at most ~1.2 requests fit at once.
    prompts = [[(7 * i + 3 * j) % (VOCAB - 1) + 1 for j in range(4 + 3 * i)] for i in range(8)]
    requests = [(0, p, 20) for p in prompts]
    trace = simulate(requests, num_blocks=6, max_num_seqs=4, max_num_batched_tokens=12, max_model_len=48)
    assert trace.num_preemptions >= 3, "the cache was meant to force preemption"
    for i, (_, prompt, max_tokens) in enumerate(requests):
        assert trace.outputs[i] == reference_output(prompt, max_tokens, 48)


def test_chunked_prefill_respects_budget_and_decodes_join():
    # A long prompt arrives while short requests decode: it is prefilled in budget-sized chunks alongside them.
    config = EngineConfig(block_size=8, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=10,
                          max_model_len=128).resolve(128)
    sched = Scheduler(config, BlockManager(64, 8))
    short = [Sequence(i, str(i), [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0), 0, frozenset())
             for i in range(2)]
    long = Sequence(2, "2", list(range(1, 40)), SamplingParams(max_tokens=5, temperature=0.0), 0, frozenset())
    for s in short:
        sched.add(s)
    out = sched.schedule()
    assert out.num_new_tokens == [3, 3] and out.samples == [True, True]
    sched.update(out, [5, 5])
    sched.add(long)
    chunks = []
    while not long.output_token_ids:
        out = sched.schedule()
        assert out.seqs[:2] == short and out.num_new_tokens[:2] == [1, 1], "decodes go first"
        assert out.num_batched_tokens <= 10
        chunks.append(out.num_new_tokens[2])
        sched.update(out, [5, 5] + ([7] if out.samples[2] else []))
    assert chunks == [8, 8, 8, 8, 7]
    assert long.output_token_ids == [7]


def test_non_chunked_waits_for_budget():
    config = EngineConfig(block_size=8, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64,
                          max_model_len=64, enable_chunked_prefill=False).resolve(64)
    sched = Scheduler(config, BlockManager(64, 8))
    a = Sequence(0, "0", list(range(1, 41)), SamplingParams(max_tokens=3, temperature=0.0), 0, frozenset())
    b = Sequence(1, "1", list(range(1, 31)), SamplingParams(max_tokens=3, temperature=0.0), 0, frozenset())
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a] and out.num_new_tokens == [40], "b (30 tokens) must not be chunked into the rest"
    sched.update(out, [9])
    out = sched.schedule()
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 30]


def test_preempts_newest_and_resumes_in_order():
    # 4 blocks of 8: two requests of 12 prompt tokens take 2 blocks each; the first to need a third block
    # preempts the newer one, which comes back (at the head of the queue) when blocks free up.
    config = EngineConfig(block_size=8, num_kv_blocks=4, max_num_seqs=4, max_num_batched_tokens=64,
                          max_model_len=32).resolve(32)
    bm = BlockManager(4, 8)
    sched = Scheduler(config, bm)
    a = Sequence(0, "0", list(range(1, 13)), SamplingParams(max_tokens=8, temperature=0.0), 0, frozenset())
    b = Sequence(1, "1", list(range(1, 13)), SamplingParams(max_tokens=8, temperature=0.0), 0, frozenset())
    c = Sequence(2, "2", [1, 2], SamplingParams(max_tokens=2, temperature=0.0), 0, frozenset())
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert out.seqs == [a, b] and bm.num_free_blocks == 0  # c does not fit: FCFS stops admission
    sched.update(out, [4, 4])
    for _ in range(4):  # a and b decode positions 12..15, the rest of their second blocks
        out = sched.schedule()
        assert out.seqs == [a, b]
        sched.update(out, [4, 4])
    out = sched.schedule()  # a needs a third block for position 16: b (newest) is preempted
    assert out.preempted == [b] and out.seqs == [a]
    assert list(sched.waiting) == [b, c] and b.num_computed_tokens == 0 and len(b.output_token_ids) == 5
