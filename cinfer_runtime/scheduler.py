"""Continuous batching over a paged KV cache. Plain Python, no tensors.

Each step, ``schedule()`` picks how many tokens every request processes under the token budget
(``max_num_batched_tokens``), the sequence limit (``max_num_seqs``) and the free blocks:

1. Running requests first, oldest first, each asking for all its uncomputed tokens (1 while decoding, the rest of
   its prompt while prefilling; chunked to what is left of the budget). When the blocks for that do not exist,
   the *newest* running request is preempted by recompute (blocks freed, put back at the head of the queue) until
   they do -- possibly the asking request itself, if it is the newest.
2. Then waiting requests in arrival order, while budget, sequence slots and blocks allow. The first one that does
   not fit stops admission (no overtaking), and nothing is admitted in a step that had to preempt. With prefix
   caching, a request starts on the cached blocks of its longest cached prefix and computes only the rest
   (``BlockManager.match_prefix``); ``update`` keys the blocks each step fills.

Invariant: every running request arrived before every waiting one. So the oldest unfinished request is always
scheduled first, is never preempted for another, and (the engine admits only requests whose full length fits the
cache) always progresses: no starvation. A preempted request recomputes prompt + output so far and continues; its
sampled tokens depend only on its tokens and (seed, step), so its output is unchanged.

``update()`` takes the step's sampled tokens, appends them, applies the stop conditions and frees finished requests.

Async scheduling (``EngineConfig.async_scheduling``): ``schedule_continuation(in_flight)`` builds the next step while
``in_flight``'s sampled tokens are still on the device, for the steady decode state only (nothing waiting, every
running request sampled in ``in_flight``, no preemption needed). It equals what ``schedule()`` would return after
``update(in_flight)``, except that a request which stops on a stop token in ``in_flight`` is still in it: that is
not known yet. ``update`` drops the token of a request that finished while its step was in flight.
"""
from collections import deque
from dataclasses import dataclass

from cinfer_runtime.block_manager import BlockManager
from cinfer_runtime.config import EngineConfig
from cinfer_runtime.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's work. Request ``seqs[i]`` processes ``token_ids[start : start + num_new_tokens[i]]`` with
    ``start = seqs[i].num_computed_tokens`` (``update`` advances it) and samples a token iff ``samples[i]``."""
    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_tables: list[list[int]]   # the block manager's live tables (read-only for the runner)
    samples: list[bool]             # the chunk reaches the end of the request's tokens: sample the next one
    preempted: list[Sequence]       # requests preempted while scheduling this step
    # Async scheduling: each request's one new token is the one the previous step (still on the device) is
    # sampling for it, so it is not in ``token_ids`` yet; the runner takes it from the device.
    input_tokens_in_flight: bool = False

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        """Every request processes one token and samples: the shape the decode CUDA graphs serve."""
        return all(n == 1 for n in self.num_new_tokens) and all(self.samples)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # arrival order: oldest first
        self.num_preemptions = 0                   # total so far (logged, and checked by tests)

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        out = SchedulerOutput([], [], [], [], [])

        def take(seq: Sequence, n: int) -> None:
            nonlocal budget
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            out.block_tables.append(bm.grow(seq.seq_id, seq.num_computed_tokens + n))
            out.samples.append(seq.num_computed_tokens + n == seq.num_tokens)
            budget -= n

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_grow(seq.seq_id, seq.num_computed_tokens + n) and self.running[-1] is not seq:
                out.preempted.append(self._preempt(self.running.pop()))
            if bm.can_grow(seq.seq_id, seq.num_computed_tokens + n):
                take(seq, n)
                i += 1
            else:  # seq is the newest and still does not fit: it yields its own blocks
                out.preempted.append(self._preempt(self.running.pop()))

        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            cached = bm.match_prefix(seq.token_ids)  # leading blocks already in the cache (prefix caching)
            n = seq.num_tokens - len(cached) * bm.block_size
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if not bm.can_take_prefix(seq.seq_id, cached, len(cached) * bm.block_size + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = bm.take_prefix(seq.seq_id, cached)
            self.running.append(seq)
            take(seq, n)
        return out

    def schedule_continuation(self, in_flight: SchedulerOutput) -> SchedulerOutput | None:
        """The next step while ``in_flight`` (scheduled, not yet ``update``d) runs on the device: every running
        request decodes the token ``in_flight`` is sampling for it. None unless that is surely the step
        ``schedule()`` would pick after ``update(in_flight)``; the caller then updates first and calls it.

        That holds when nothing waits (no admission), ``in_flight`` holds exactly the running requests and each
        samples in it (so each next has one uncomputed token), one token each fits the budget, and the blocks for
        all exist (no preemption). Requests whose ``in_flight`` token surely ends them by length are left out;
        one that stops on a stop token is included (not known yet) and ``update`` drops its token. No request
        may have a repetition penalty: the sampler needs its full token history, which lags one token here.
        """
        if self.waiting or not all(in_flight.samples):
            return None
        if [s for s in in_flight.seqs if not s.is_finished] != self.running:
            return None
        max_model_len = self.config.max_model_len
        # After in_flight's update each request has one more output token and num_tokens + 1 tokens.
        seqs = [s for s in self.running
                if s.num_output_tokens + 1 < s.params.max_tokens and s.num_tokens + 1 < max_model_len]
        if not seqs or len(seqs) > self.config.max_num_batched_tokens:
            return None
        if any(s.params.repetition_penalty != 1.0 for s in seqs):
            return None
        bm = self.block_manager
        # The new token sits at position num_tokens (the in-flight token is not appended yet).
        if sum(bm.num_new_blocks(s.seq_id, s.num_tokens + 1) for s in seqs) > bm.num_free_blocks:
            return None
        return SchedulerOutput(seqs=seqs, num_new_tokens=[1] * len(seqs),
                               block_tables=[bm.grow(s.seq_id, s.num_tokens + 1) for s in seqs],
                               samples=[True] * len(seqs), preempted=[], input_tokens_in_flight=True)

    def _preempt(self, seq: Sequence) -> Sequence:
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Victims are taken newest first, so pushing each to the front keeps the queue in arrival order.
        self.waiting.appendleft(seq)
        return seq

    def update(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Advance the step's requests. ``sampled_token_ids``: one token per request with ``samples[i]``, in
        order. Returns the requests that got a token (finished ones have ``finish_reason`` set, blocks freed).

        A request already finished is skipped and its token dropped: with async scheduling a step is scheduled
        before the previous one's tokens are known, so it may hold a request that stopped in that previous step,
        or one aborted meanwhile."""
        max_model_len = self.config.max_model_len
        sampled = iter(sampled_token_ids)
        advanced = []
        any_finished = False
        for seq, n, samples in zip(out.seqs, out.num_new_tokens, out.samples):
            token = next(sampled) if samples else None
            if seq.is_finished:
                continue
            seq.num_computed_tokens += n
            self.block_manager.cache_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if not samples:
                continue
            seq.token_ids.append(token)
            advanced.append(seq)
            if token in seq.stop_token_ids:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
                seq.finish_reason = "length"
            else:
                continue
            seq.status = SequenceStatus.FINISHED
            self.block_manager.free(seq.seq_id)
            any_finished = True
        if next(sampled, None) is not None:
            raise ValueError("more sampled tokens than requests that sample")
        if any_finished:
            self.running = [s for s in self.running if not s.is_finished]
        return advanced

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished request (e.g. its stream was closed) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
