"""The whole engine as a hypothesis state machine: random interleavings of ``add_request``, ``step()``, streams
(advanced, closed midway), aborts, ``generate`` calls and bad requests, on a tiny float32 Llama with a cache small
enough to preempt all the time and a token budget small enough to chunk most prompts.

After every step: the block manager's accounting (every block free or owned by exactly one running request), each
request holding exactly the blocks its computed tokens need, FCFS order, and every request's tokens so far being a
prefix of what it must produce. When an example ends (or on a ``drain`` action): everything runs to completion,
every request's final output equals its reference (HF greedy ``generate``, cut at the first stop/EOS token, ended by
``max_tokens`` or ``max_model_len``) with the right ``finish_reason``, every token advance was delivered exactly once
(through ``step()``, a stream or ``generate``), and the cache is empty again. The same engine serves every example,
so its reuse after draining is tested too.

The seeded variant mixes seeded sampling requests in: each must produce the tokens of the same request run alone on
a one-sequence-at-a-time engine, whatever else was in flight or preempted it.

The last tests are minimal cases of the runtime bugs the machine found (all fixed: outputs now go to the request's
owner). The machine still steers around them as it did while they were open (``EngineMachine.pinned``, the streams
it closes); that only loosens what it checks, and can go.
"""
import functools
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import cinfer_runtime
from cinfer_runtime import SamplingParams
from cinfer_runtime.config import cdiv
from cinfer_runtime.sequence import Sequence, SequenceStatus

from ..tolerances import LOGITS
from .conftest import hf_greedy, make_prompts, tiny_llama

VOCAB_SIZE = 256
BLOCK_SIZE = 8
NUM_KV_BLOCKS = 8            # 64 slots for up to 3 requests of up to 48 tokens: preemption is routine
MAX_NUM_SEQS = 3
MAX_NUM_BATCHED_TOKENS = 16  # below most prompt lengths: prefill is chunked, next to other requests' decodes
MAX_MODEL_LEN = 48           # the long prompts end on max_model_len before max_tokens
MAX_TOKENS = 24
POOL_LENS = [1, 3, 7, 8, 9, 16, 17, 25, 33, 40, 47, 48]
MAX_OPEN_STREAMS = 2
MAX_DRAIN_STEPS = 2000       # far more than any example needs: hitting it means the engine stopped progressing

# Seeded sampling configurations, each exercising a different part of the sampler.
SAMPLING = [
    dict(temperature=1.0),
    dict(temperature=1.0, top_k=8),
    dict(temperature=0.7, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
]
SEEDS = [0, 1, 12345]

# Fields SamplingParams must reject, each with a value it must reject.
INVALID_PARAMS = [("max_tokens", 0), ("temperature", -0.5), ("top_k", 0), ("top_p", 0.0), ("min_p", 1.5),
                  ("repetition_penalty", 0.0), ("seed", 1.5), ("stop_token_ids", [-1]), ("ignore_eos", 1)]
BAD_REQUESTS = ["empty prompt", "token id = vocab size", "negative token id", "prompt longer than max_model_len",
                "float token id", "string without tokenizer", "params not a SamplingParams", "invalid SamplingParams",
                "request id in use", "generate with one bad prompt", "generate with too few params",
                "stream of a bad prompt"]

MACHINE_SETTINGS = settings(max_examples=max(40, settings.default.max_examples // 3), stateful_step_count=30,
                            deadline=None)


def max_new_tokens(prompt_len: int) -> int:
    """Most tokens a request with this prompt can generate: max_model_len ends it, but it always gets one."""
    return max(1, min(MAX_TOKENS, MAX_MODEL_LEN - prompt_len))


def compile_engine(model, max_num_seqs: int = MAX_NUM_SEQS):
    return cinfer_runtime.compile(model, block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_model_len=MAX_MODEL_LEN,
                                  inner_backend="eager")


# ------------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class PoolPrompt:
    token_ids: list[int]
    greedy: list[int]    # HF greedy continuation, EOS ignored, max_new_tokens(len) long


@torch.no_grad()
def top2_gap(model, prompt: list[int], continuation: list[int]) -> float:
    """Smallest gap between the best and second-best logit over the steps that produced ``continuation``."""
    logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1:-1]
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).min().item()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def pool(model) -> list[PoolPrompt]:
    """One prompt per length whose HF greedy continuation has no near-tie: a logit error within the fp32 tolerance
    cannot flip any of its argmaxes, so cinfer must reproduce it exactly."""
    atol, _ = LOGITS[torch.float32]
    prompts = []
    for n in POOL_LENS:
        for seed in range(50):
            tokens = make_prompts(VOCAB_SIZE, lens=[n], seed=seed)[0]
            greedy = hf_greedy(model, tokens, max_new_tokens(n), ignore_eos=True)
            if top2_gap(model, tokens, greedy) > 4 * atol:
                prompts.append(PoolPrompt(tokens, greedy))
                break
        else:
            raise AssertionError(f"no prompt of length {n} without a near-tie in its greedy continuation")
    # The model's EOS becomes the token most continuations contain, so EOS (and ignore_eos) matter. The references
    # ignore EOS; expected_output cuts them at it, as HF generate with this EOS would stop there.
    counts = Counter(t for p in prompts for t in set(p.greedy))
    eos = min(counts, key=lambda t: (-counts[t], t))
    model.generation_config.eos_token_id = eos
    model.config.eos_token_id = eos
    return prompts


@dataclass(frozen=True)
class RequestSpec:
    prompt: int                          # index into the pool
    max_tokens: int
    stop_at: int | None                  # stop on the reference's token at this index (mod its length)
    extra_stop: int | None               # and on this token id, which may or may not come up
    ignore_eos: bool
    named: bool                          # pass an explicit request_id
    sampling: tuple[int, int] | None     # (index into SAMPLING, seed); None: greedy


def request_specs(sampled: bool):
    sampling = st.none()
    if sampled:
        sampling = sampling | st.tuples(st.integers(0, len(SAMPLING) - 1), st.sampled_from(SEEDS))
    return st.builds(RequestSpec, prompt=st.integers(0, len(POOL_LENS) - 1), max_tokens=st.integers(1, MAX_TOKENS),
                     stop_at=st.none() | st.integers(0, MAX_TOKENS - 1),
                     extra_stop=st.none() | st.integers(0, VOCAB_SIZE - 1), ignore_eos=st.booleans(),
                     named=st.booleans(), sampling=sampling)


def expected_output(continuation: list[int], params: SamplingParams, eos_ids, prompt_len: int):
    """What a request must produce, given its full EOS-ignoring continuation: (tokens, finish_reason, why)."""
    limit = min(params.max_tokens, max_new_tokens(prompt_len))
    assert len(continuation) >= limit
    stops = set(params.stop_token_ids or ())
    eos = set() if params.ignore_eos else set(eos_ids)
    for i, token in enumerate(continuation[:limit]):
        if token in stops or token in eos:
            return continuation[:i + 1], "stop", "stop id" if token in stops else "eos"
    why = "max_tokens" if limit == params.max_tokens else "max_model_len"
    return continuation[:limit], "length", why


# ----------------------------------------------------------------------------------------------- machine
@dataclass
class Tracked:
    """What the machine knows about one request."""
    seq: Sequence | None                 # the engine's own object (None for generate()'s requests)
    prompt: list[int]
    expected: list[int]
    reason: str                          # the expected finish_reason
    why: str                             # what ends it: "stop id", "eos", "max_tokens", "max_model_len"
    delivered: Counter = field(default_factory=Counter)    # output length -> times delivered
    last_len: dict[str, int] = field(default_factory=dict)  # channel ("step", "stream") -> last length seen there
    done: bool = False                   # its final output was delivered
    aborted_at: int | None = None        # output tokens it had when aborted
    # Output lengths whose delivery a closed stream dropped (its own unyielded outputs; see ``close_stream``).
    lost: set[int] = field(default_factory=set)
    stream_started: bool = False


def _tracks_failure(method):
    """Marks the machine unclean while a rule or invariant runs, so that teardown skips its final checks after a
    failure (they would only pile a second error onto the first) and just resets the engine."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self.clean = False
        result = method(self, *args, **kwargs)
        self.clean = True
        return result
    return wrapper


# Each rule draws one action; repeats weight the mix towards submitting and stepping, and "drain" comes first because
# hypothesis shrinks choices towards the first (draining an idle engine changes nothing). One rule rather than one
# per action because hypothesis' stateful runs enable a random subset of the rules in each example ("swarm
# testing"): with a few dozen examples that left whole kinds of interleaving (streams closed midway, aborts of
# running requests) out of a run, and the coverage checks of run_machine unmet.
ACTIONS = ["drain"] + ["step"] * 3 + ["add_request"] * 3 + ["abort_request", "generate", "bad_request"]


class EngineMachine(RuleBasedStateMachine):
    """Drives one engine, shared by all examples; ``machine_class`` binds it and the references."""
    engine = None
    make_engine = None       # () -> a fresh engine like ``engine``
    continuation = None      # RequestSpec -> the request's full EOS-ignoring continuation
    specs = None             # strategy of RequestSpec
    pool: list[PoolPrompt] = []
    stats: Counter = Counter()

    def __init__(self):
        super().__init__()
        e = self.engine
        # The previous example ended by draining or aborting everything: the engine must be as good as new.
        assert not e.has_unfinished_requests()
        assert e.step() == [], "an output left over from the previous example"
        bm = e.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not bm.block_tables
        self.requests: dict[str, Tracked] = {}
        self.streams: dict[str, object] = {}    # request id -> open stream() iterator
        # A stream that yielded while requests newer than its own also advanced: it holds their outputs of that step
        # until resumed, and drops them if closed (test_stream_closed_midway_loses_no_output_of_other_requests, a
        # known bug). Until it is resumed or closed nothing else steps the engine, which would reorder them; closing
        # it marks them lost, and they are then exempt from the "every advance delivered once" check.
        self.pinned: str | None = None
        self.held: dict[str, range] = {}        # request id -> output lengths the pinned stream may hold
        self.num_named = 0
        self.preemptions_before = e.scheduler.num_preemptions
        self.clean = True

    @rule(data=st.data())
    @_tracks_failure
    def act(self, data):
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        getattr(self, action)(data)

    # ---------------------------------------------------------------------------------------- actions
    def add_request(self, data) -> None:
        """Submit through add_request(), or through stream() (while fewer than MAX_OPEN_STREAMS are open)."""
        spec = data.draw(self.specs, label="spec")
        prompt, params, t = self.resolve(spec)
        if data.draw(st.booleans(), label="as stream") and len(self.streams) < MAX_OPEN_STREAMS:
            stream = self.engine.stream(prompt, params)   # validated and queued now, before it is iterated
            t.seq = self.engine.scheduler.waiting[-1]
            assert t.seq.prompt_token_ids == prompt and t.seq.request_id not in self.requests
            self.requests[t.seq.request_id] = t
            self.streams[t.seq.request_id] = stream
            return
        request_id = None
        if spec.named:
            request_id = f"user-{self.num_named}"
            self.num_named += 1
        rid = self.engine.add_request(prompt, params, request_id=request_id)
        assert rid not in self.requests and (request_id is None or rid == request_id)
        t.seq = self.engine.scheduler.waiting[-1]
        assert t.seq.request_id == rid
        self.requests[rid] = t

    def step(self, data) -> None:
        """A few step() calls or, half the time while a stream is open (always while one is pinned), a few outputs
        from a stream, which is then maybe closed (an abort if it is unfinished)."""
        num_steps = data.draw(st.integers(1, 4), label="steps")
        if self.pinned or (self.streams and data.draw(st.booleans(), label="via a stream")):
            self.advance_stream(data, num_steps)
            return
        for _ in range(num_steps):
            self.deliver(self.engine.step(), "step")

    def advance_stream(self, data, num_outputs: int) -> None:
        rid = self.pinned or data.draw(st.sampled_from(sorted(self.streams)), label="stream")
        stream, t = self.streams[rid], self.requests[rid]
        t.stream_started = True
        for _ in range(num_outputs):
            newer = {r: u.seq.num_output_tokens for r, u in self.requests.items()
                     if u.seq is not None and u.seq.seq_id > t.seq.seq_id}
            out = next(stream, None)
            self.pinned, self.held = None, {}
            if out is None:   # it ended: finished (its last output came here or through step()) or aborted
                assert t.seq.is_finished
                del self.streams[rid]
                return
            assert out.request_id == rid
            self.deliver([out], "stream")
            self.held = {r: range(n + 1, self.requests[r].seq.num_output_tokens + 1) for r, n in newer.items()
                         if self.requests[r].seq.num_output_tokens > n}
            self.pinned = rid if self.held else None
        # Only a stream that was iterated: one closed before its first next() is not aborted (the known bug of
        # test_stream_closed_before_its_first_output_aborts_its_request).
        if data.draw(st.booleans(), label="close it"):
            self.close_stream(rid)

    def close_stream(self, rid: str) -> None:
        stream = self.streams.pop(rid)
        t = self.requests[rid]
        if not t.seq.is_finished:
            self.stats["stream closed midway"] += 1
        # A stream owns its request's outputs, also those that others' steps produced: what it had not yielded yet
        # is dropped with it.
        t.lost.update(range(max(t.delivered, default=0) + 1, t.seq.num_output_tokens + 1))
        if rid == self.pinned:
            for r, lengths in self.held.items():
                self.requests[r].lost.update(lengths)
            self.pinned, self.held = None, {}
        self.abort_checked(rid, stream.close)

    def abort_request(self, data) -> None:
        """Abort a running request (holding blocks, maybe mid-prefill), a waiting one (maybe preempted), any one
        submitted in this example (mostly finished: a no-op) or an id the engine never saw (a no-op)."""
        victim = data.draw(st.sampled_from(["running", "waiting", "any submitted", "unknown"]), label="victim")
        candidates = {"running": [q.request_id for q in self.engine.scheduler.running],
                      "waiting": [q.request_id for q in self.engine.scheduler.waiting],
                      "any submitted": list(self.requests),
                      "unknown": []}[victim]
        if not candidates:
            before = self.snapshot()
            self.engine.abort_request("no-such-request")
            assert self.snapshot() == before
            return
        rid = data.draw(st.sampled_from(sorted(candidates)), label="request")
        self.abort_checked(rid, lambda: self.engine.abort_request(rid))

    def generate(self, data) -> None:
        """generate() one or two requests while the others are in flight (they keep running alongside)."""
        if self.pinned:   # generate() would step the engine
            self.advance_stream(data, 1)
            return
        resolved = [self.resolve(spec) for spec in data.draw(st.lists(self.specs, min_size=1, max_size=2),
                                                             label="batch")]
        outs = self.engine.generate([p for p, _, _ in resolved], [sp for _, sp, _ in resolved], use_tqdm=False)
        assert len(outs) == len(resolved)
        for out, (_, _, t) in zip(outs, resolved):
            assert out.request_id not in self.requests
            self.requests[out.request_id] = t
            # generate() returns only final outputs: its requests' earlier advances are delivered nowhere.
            self.deliver([out], "generate")
            assert t.done

    def bad_request(self, data) -> None:
        """A request that must be rejected before any work, leaving everything in flight exactly as it was."""
        kind = data.draw(st.sampled_from(BAD_REQUESTS), label="kind")
        prompt, params, _ = self.resolve(data.draw(self.specs, label="spec"))
        e, vocab = self.engine, self.engine.vocab_size
        too_long = (prompt * (MAX_MODEL_LEN + 1))[:MAX_MODEL_LEN + 1]
        name, value = data.draw(st.sampled_from(INVALID_PARAMS), label="invalid field")
        unfinished = [q.request_id for q in self.queued()]
        if kind == "request id in use" and not unfinished:
            kind = "empty prompt"
        cases = {
            "empty prompt": (ValueError, "empty", lambda: e.add_request([], params)),
            "token id = vocab size": (ValueError, "outside the vocabulary",
                                      lambda: e.add_request(prompt[:-1] + [vocab], params)),
            "negative token id": (ValueError, "outside the vocabulary", lambda: e.add_request([-1] + prompt, params)),
            "prompt longer than max_model_len": (ValueError, "max_model_len", lambda: e.add_request(too_long, params)),
            "float token id": (TypeError, "ints", lambda: e.add_request(prompt[:-1] + [3.0], params)),
            "string without tokenizer": (TypeError, "tokenizer", lambda: e.add_request("w3 w4", params)),
            "params not a SamplingParams": (TypeError, "SamplingParams", lambda: e.add_request(prompt, vars(params))),
            "invalid SamplingParams": (ValueError, name,
                                       lambda: e.add_request(prompt, SamplingParams(**{name: value}))),
            "request id in use": (ValueError, "already in use",
                                  lambda: e.add_request(prompt, params, request_id=unfinished[-1])),
            "generate with one bad prompt": (ValueError, "empty",
                                             lambda: e.generate([prompt, []], params, use_tqdm=False)),
            "generate with too few params": (ValueError, "1 SamplingParams for 2 prompts",
                                             lambda: e.generate([prompt, prompt], [params], use_tqdm=False)),
            "stream of a bad prompt": (ValueError, "outside the vocabulary", lambda: e.stream([vocab], params)),
        }
        error, words, call = cases[kind]
        before = self.snapshot()
        with pytest.raises(error, match=words):
            call()
        assert self.snapshot() == before, f"{kind}: the rejected request changed the engine"
        self.stats["rejected"] += 1

    def drain(self, data=None) -> None:
        """Finish every request (open streams through their iterators, the rest through step()) and check them."""
        e = self.engine
        for rid in sorted(self.streams, key=lambda r: r != self.pinned):
            self.deliver(list(self.streams.pop(rid)), "stream")
        self.pinned, self.held = None, {}
        steps = 0
        while e.has_unfinished_requests():
            self.deliver(e.step(), "step")
            self.check_block_accounting()
            steps += 1
            assert steps < MAX_DRAIN_STEPS, "the engine stopped making progress"
        # Outputs of requests that advanced inside a stream()/generate() call for others come with the next step(),
        # even when nothing is left to run (see test_incremental_loop_gets_outputs_produced_inside_generate).
        self.deliver(e.step(), "step")
        for rid, t in self.requests.items():
            if t.aborted_at is None:
                assert t.done or len(t.expected) in t.lost, (
                    f"request {rid} never delivered its final output (got {dict(t.delivered)})")
                missing = set(range(1, len(t.expected) + 1)) - set(t.delivered) - t.lost
                assert not missing or t.seq is None, f"request {rid}: advances {sorted(missing)} never delivered"
        bm = e.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not bm.block_tables
        assert e.step() == []

    # ---------------------------------------------------------------------------------------- helpers
    def resolve(self, spec: RequestSpec):
        """The prompt, params and expected output of a spec."""
        prompt = self.pool[spec.prompt].token_ids
        continuation = self.continuation(spec)
        stop = []
        if spec.stop_at is not None:
            stop.append(continuation[spec.stop_at % len(continuation)])
        if spec.extra_stop is not None:
            stop.append(spec.extra_stop)
        if spec.sampling is None:
            kwargs = dict(temperature=0.0)
        else:
            config, seed = spec.sampling
            kwargs = dict(SAMPLING[config], seed=seed)
        params = SamplingParams(max_tokens=spec.max_tokens, stop_token_ids=stop or None, ignore_eos=spec.ignore_eos,
                                **kwargs)
        expected, reason, why = expected_output(continuation, params, self.engine.eos_token_ids, len(prompt))
        return prompt, params, Tracked(None, prompt, expected, reason, why)

    def queued(self) -> list[Sequence]:
        s = self.engine.scheduler
        return list(s.running) + list(s.waiting)

    def snapshot(self):
        """Everything a rejected request must leave as it was."""
        s = self.engine.scheduler
        bm = s.block_manager

        def rows(seqs):
            return [(q.request_id, q.status, q.num_computed_tokens, tuple(q.token_ids)) for q in seqs]
        return (rows(s.waiting), rows(s.running), bm.free_block_ids(),
                {k: list(v) for k, v in bm.block_tables.items()}, s.num_preemptions)

    def deliver(self, outputs, channel: str) -> None:
        """Check outputs the engine handed back (cumulative tokens of one request each) against the model."""
        for out in outputs:
            t = self.requests.get(out.request_id)
            assert t is not None, f"output of a request nobody submitted: {out}"
            n = len(out.token_ids)
            assert out.prompt_token_ids == t.prompt
            assert n >= 1 and out.token_ids == t.expected[:n], (
                f"request {out.request_id}: got {out.token_ids}, expected a prefix of {t.expected}")
            assert n > t.last_len.get(channel, 0), f"request {out.request_id}: outputs out of order on {channel}"
            t.last_len[channel] = n
            t.delivered[n] += 1
            assert t.delivered[n] == 1, f"request {out.request_id}: its token {n} was delivered twice"
            if t.aborted_at is not None:
                assert n <= t.aborted_at and not out.finished, f"request {out.request_id} advanced after its abort"
            elif n == len(t.expected):
                assert out.finish_reason == t.reason, f"request {out.request_id}: {out.finish_reason} != {t.reason}"
                t.done = True
                self.stats[f"finished: {t.why}"] += 1
            else:
                assert out.finish_reason is None, f"request {out.request_id} finished early: {out}"

    def abort_checked(self, rid: str, how) -> None:
        """Abort ``rid`` through ``how()`` and check it let go of everything (or, finished, that nothing changed)."""
        t = self.requests[rid]
        if t.seq is None or t.seq.is_finished:   # finished (its last output may still be undelivered): a no-op
            before = self.snapshot()
            how()
            assert self.snapshot() == before
            return
        bm = self.engine.scheduler.block_manager
        free_before = bm.num_free_blocks
        # Blocks only this request holds come free; prefix-cached blocks it shares stay with the other holders.
        held = sum(1 for b in bm.block_tables.get(t.seq.seq_id, ()) if bm.refcount(b) == 1)
        self.stats[f"aborted while {t.seq.status.value}"] += 1
        how()
        t.aborted_at = t.seq.num_output_tokens
        assert t.seq.is_finished and all(q is not t.seq for q in self.queued())
        bm = self.engine.scheduler.block_manager
        assert t.seq.seq_id not in bm.block_tables and bm.num_free_blocks == free_before + held

    def teardown(self):
        try:
            if self.clean:
                self.drain()
                self.stats["preemptions"] += self.engine.scheduler.num_preemptions - self.preemptions_before
        finally:
            # After a failure, leave nothing behind for the next example (which checks the engine is idle). An engine
            # the failure broke for good (a leaked block, say) is replaced, so that every example, hypothesis'
            # replays of the failing one included, starts from the same state.
            if not self.reset_engine():
                type(self).engine = self.make_engine()

    def reset_engine(self) -> bool:
        """Abort everything in flight; True if the engine is then idle with every block free."""
        try:
            for stream in self.streams.values():
                stream.close()
            for q in self.queued():
                self.engine.abort_request(q.request_id)
            for _ in range(MAX_DRAIN_STEPS):
                if not self.engine.step():
                    break
            bm = self.engine.scheduler.block_manager
            return (not self.engine.has_unfinished_requests() and not bm.block_tables
                    and sorted(bm.free_block_ids()) == list(range(bm.num_blocks)))
        except Exception:
            return False

    def check_block_accounting(self) -> None:
        """Every block is held (by as many tables as its reference count says; prefix caching shares full
        blocks) or free, never both, none lost."""
        bm = self.engine.scheduler.block_manager
        owned = [b for table in bm.block_tables.values() for b in table]
        free = bm.free_block_ids()
        assert len(free) == len(set(free)), "a block is free twice"
        assert not set(owned) & set(free), "a block is owned and free"
        assert set(owned) | set(free) == set(range(bm.num_blocks)), "a block is lost"
        for block in set(owned):
            assert bm.refcount(block) == owned.count(block), f"block {block}: wrong reference count"
        for table in bm.block_tables.values():
            assert len(table) == len(set(table)), "a table holds one block twice"

    @invariant()
    @_tracks_failure
    def engine_state_is_consistent(self):
        self.check_block_accounting()
        s = self.engine.scheduler
        bm = s.block_manager

        running, waiting = list(s.running), list(s.waiting)
        assert len(running) <= MAX_NUM_SEQS
        assert self.engine.has_unfinished_requests() == bool(running or waiting or self.engine._undelivered)
        assert set(bm.block_tables) == {q.seq_id for q in running}, "only running requests hold blocks"
        for q in running:
            assert q.status is SequenceStatus.RUNNING
            # Exactly the blocks its computed tokens need; the last sampled token is never computed yet.
            assert 0 < q.num_computed_tokens < q.num_tokens
            assert len(bm.block_tables[q.seq_id]) == cdiv(q.num_computed_tokens, BLOCK_SIZE)
        for q in waiting:
            assert q.status is SequenceStatus.WAITING and q.num_computed_tokens == 0
        ids = [q.seq_id for q in running + waiting]
        assert ids == sorted(ids), "running requests must all be older than waiting ones, each in arrival order"

        queued = {id(q) for q in running + waiting}
        for rid, t in self.requests.items():
            if t.seq is None:
                continue
            if t.aborted_at is None:
                assert t.seq.output_token_ids == t.expected[:t.seq.num_output_tokens], (
                    f"request {rid} went wrong: {t.seq.output_token_ids} vs {t.expected}")
            assert (id(t.seq) in queued) == (not t.seq.is_finished), f"request {rid} got lost or was left queued"


def machine_class(make_engine, pool, continuation, specs, stats: Counter) -> type[EngineMachine]:
    """``EngineMachine`` submitting requests drawn from ``specs``, on an engine from ``make_engine()``."""
    return type("EngineMachine", (EngineMachine,), dict(
        engine=make_engine(), make_engine=staticmethod(make_engine), pool=pool,
        continuation=staticmethod(continuation), specs=specs, stats=stats))


def run_machine(machine: type[EngineMachine], stats: Counter) -> None:
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
    # The interleavings did reach what the test is about.
    for what in ("finished: stop id", "finished: eos", "finished: max_tokens", "finished: max_model_len",
                 "aborted while running", "aborted while waiting", "stream closed midway",
                 "rejected", "preemptions"):
        assert stats[what] > 0, f"no example reached {what!r}: {dict(stats)}"


# ------------------------------------------------------------------------------------------------- tests
def test_engine_matches_hf_under_random_interleavings(model, pool):
    stats = Counter()
    machine = machine_class(lambda: compile_engine(model), pool, lambda spec: pool[spec.prompt].greedy,
                            request_specs(sampled=False), stats)
    run_machine(machine, stats)


def test_seeded_sampling_independent_of_what_else_runs(model, pool):
    alone_engine = compile_engine(model, max_num_seqs=1)
    alone: dict[tuple, list[int]] = {}

    def continuation(spec: RequestSpec) -> list[int]:
        """Greedy: HF. Seeded: the same request alone on a one-sequence engine, EOS ignored and as long as it gets
        (a seeded request's token i depends only on its tokens before it, its seed and i, so shorter or stopped
        requests produce a prefix of it)."""
        if spec.sampling is None:
            return pool[spec.prompt].greedy
        key = (spec.prompt, spec.sampling)
        if key not in alone:
            prompt = pool[spec.prompt].token_ids
            config, seed = spec.sampling
            params = SamplingParams(max_tokens=max_new_tokens(len(prompt)), ignore_eos=True, seed=seed,
                                    **SAMPLING[config])
            alone[key] = alone_engine.generate([prompt], params, use_tqdm=False)[0].token_ids
        return alone[key]

    stats = Counter()
    machine = machine_class(lambda: compile_engine(model), pool, continuation, request_specs(sampled=True), stats)
    run_machine(machine, stats)
    assert len(alone) >= 5, "few seeded requests were drawn"


# ---------------------------------------------------------------------- fixed bugs, minimal regression cases
@pytest.fixture
def engine(model, pool):
    return compile_engine(model)


# Regression (fixed): Engine.stream() queues its request at the call, but the abort lives in the generator's
# finally, which never runs for a generator closed (or dropped) before its first next(): the request keeps running
# and its outputs surface in step()
def test_stream_closed_before_its_first_output_aborts_its_request(engine, pool):
    stream = engine.stream(pool[3].token_ids, SamplingParams(max_tokens=4, temperature=0.0))
    stream.close()
    assert not engine.has_unfinished_requests()
    assert engine.step() == []


# Regression (fixed): has_unfinished_requests() is False while outputs of an add_request() request that finished
# inside generate() are still waiting for the next step(): the usual `while has_unfinished_requests(): step()` loop
# never gets its final output
def test_incremental_loop_gets_outputs_produced_inside_generate(engine, pool):
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    pending = engine.add_request(pool[1].token_ids, params)
    engine.generate([pool[2].token_ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                    use_tqdm=False)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.token_ids for o in outputs if o.request_id == pending and o.finished] == [pool[1].greedy[:3]]


# Regression (fixed): Engine._stream yields its own output from inside its loop over the step's advanced requests:
# the outputs of requests after it in that step are only queued for step() when the generator resumes, so closing it
# there drops them (a request's final output included), and a step() meanwhile returns them out of order
def test_stream_closed_midway_loses_no_output_of_other_requests(engine, pool):
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    stream = engine.stream(pool[0].token_ids, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    pending = engine.add_request(pool[1].token_ids, params)   # newer: after the stream's request in every step
    assert len(next(stream).token_ids) == 1                   # the step that prefilled both
    stream.close()
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    outputs += engine.step()
    assert [o.token_ids for o in outputs if o.request_id == pending] == [pool[1].greedy[:n] for n in (1, 2, 3)]


# Regression (fixed): outputs go to whoever is stepping the engine, not to the request's owner: a stream whose
# request another call (generate(), another stream, step()) ran to the end yields nothing more, never its finished
# output; those outputs come out of step() instead
def test_stream_yields_its_final_output_when_another_call_ran_it(engine, pool):
    stream = engine.stream(pool[0].token_ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    engine.generate([pool[1].token_ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                    use_tqdm=False)
    outputs = list(stream)
    assert outputs and outputs[-1].finished and outputs[-1].token_ids == pool[0].greedy[:2]
