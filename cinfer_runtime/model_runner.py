"""Turns a ``SchedulerOutput`` into one run of the compiled model and the sampler, returning the sampled tokens.

The step's tokens are flattened into one row ``[1, num_tokens]``; their positions and attention metadata go into
buffers allocated once (static addresses, which CUDA graphs need). On a GPU each buffer has a pinned host twin:
the step is assembled there with numpy, then copied with non-blocking copies, so the only host/device
synchronisation of a step is reading the sampled tokens back.

``execute`` runs a step and returns its tokens. ``launch`` (async scheduling) returns an ``InFlightStep`` instead,
without waiting: the tokens are copied to pinned host memory behind a CUDA event and read by
``InFlightStep.token_ids()``. Meanwhile the next step may be launched; its input tokens are then gathered on the
device from the in-flight step's sampled tokens. Launched steps are assembled in two host buffer sets, used in
turn (``HostStaging``): a set is refilled only once its previous step's tokens were read, which is after the
device finished reading the set's inputs.
"""
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import Tensor

import cinfer_ops
from cinfer_ops.launch import compile_ahead
from cinfer_ops.paged_attention import decode_variant_batches
from cinfer_runtime.config import EngineConfig, cdiv
from cinfer_runtime.cuda_graphs import StepGraphs, decode_buckets, prefill_buckets
from cinfer_runtime.sampler import Sampler, SamplingRow
from cinfer_runtime.sampling_params import SamplingParams
from cinfer_runtime.scheduler import SchedulerOutput
from graph_passes.attention_metadata import AttentionMetadata

@dataclass
class StepBuffers:
    """The compiled graph's inputs at their largest; a step uses a prefix of each."""
    input_ids: Tensor        # int64 [max_num_tokens]
    positions: Tensor        # int64 [max_num_tokens]
    slot_mapping: Tensor     # int64 [max_num_tokens]
    block_tables: Tensor     # int32 [max_batch, max_blocks_per_seq]
    seq_lens: Tensor         # int32 [max_batch]
    query_start_loc: Tensor  # int32 [max_batch + 1]
    logits_indices: Tensor   # int64 [max_batch]

    @classmethod
    def allocate(cls, max_num_tokens: int, max_batch: int, max_blocks_per_seq: int, device: torch.device,
                 pin_memory: bool = False) -> "StepBuffers":
        def buf(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        return cls(buf(max_num_tokens, dtype=torch.int64), buf(max_num_tokens, dtype=torch.int64),
                   buf(max_num_tokens, dtype=torch.int64), buf(max_batch, max_blocks_per_seq, dtype=torch.int32),
                   buf(max_batch, dtype=torch.int32), buf(max_batch + 1, dtype=torch.int32),
                   buf(max_batch, dtype=torch.int64))

    def copy_(self, src: "StepBuffers", num_tokens: int, batch: int) -> None:
        """Copy the live prefixes of ``src`` (pinned host buffers) without blocking the host."""
        for name in ("input_ids", "positions", "slot_mapping"):
            getattr(self, name)[:num_tokens].copy_(getattr(src, name)[:num_tokens], non_blocking=True)
        for name in ("block_tables", "seq_lens", "logits_indices"):
            getattr(self, name)[:batch].copy_(getattr(src, name)[:batch], non_blocking=True)
        self.query_start_loc[:batch + 1].copy_(src.query_start_loc[:batch + 1], non_blocking=True)

    def model_inputs(self, num_tokens: int, batch: int) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """Views of the live prefixes, as the compiled model takes them: input_ids and positions ``[1, num_tokens]``."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens], block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            logits_indices=self.logits_indices[:batch])
        return self.input_ids[:num_tokens].unsqueeze(0), self.positions[:num_tokens].unsqueeze(0), meta


@dataclass
class HostStaging:
    """A host buffer set a launched step is assembled in (pinned on a GPU), and where its sampled tokens arrive."""
    buffers: StepBuffers
    arrays: dict[str, np.ndarray]        # numpy views of ``buffers``
    sampled_token_ids: Tensor            # int64 [max_batch]
    done: torch.cuda.Event | None        # recorded after the step's last copy from or to this set; None on CPU
    in_use: bool = False                 # a launched step's tokens have not been read yet

    @classmethod
    def allocate(cls, max_num_tokens: int, max_batch: int, max_blocks_per_seq: int, on_gpu: bool) -> "HostStaging":
        buffers = StepBuffers.allocate(max_num_tokens, max_batch, max_blocks_per_seq, torch.device("cpu"),
                                       pin_memory=on_gpu)
        return cls(buffers, _numpy_views(buffers), torch.zeros(max_batch, dtype=torch.int64, pin_memory=on_gpu),
                   torch.cuda.Event() if on_gpu else None)


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens the host has not read yet."""
    out: SchedulerOutput
    sampled_token_ids: Tensor   # int64 [number of requests that sample] on the device, in ``out.seqs`` order
    staging: HostStaging        # holds the step's inputs and receives its tokens

    def token_ids(self) -> list[int]:
        """Wait for the step and return its sampled tokens (one per request with ``out.samples[i]``, in order)."""
        staging = self.staging
        if staging.done is not None:
            staging.done.synchronize()
        tokens = staging.sampled_token_ids[:self.sampled_token_ids.shape[0]].tolist()
        staging.in_use = False
        return tokens


def _numpy_views(buffers: StepBuffers) -> dict[str, np.ndarray]:
    return {name: getattr(buffers, name).numpy() for name in StepBuffers.__dataclass_fields__}


def _spread(num_tokens: int, batch: int) -> list[int]:
    """New-token counts of ``batch`` made-up sequences sharing ``num_tokens`` tokens as evenly as possible."""
    return [num_tokens // batch + (i < num_tokens % batch) for i in range(batch)]


def warm_up_steps(max_batch: int, max_num_tokens: int, max_model_len: int, all_variants: bool,
                  decode_batches: Sequence[int] = ()) -> list[list[int]]:
    """The new-token counts (one per made-up sequence) of the warm-up's dummy steps.

    A small prefill-shaped and a small decode-shaped step compile the model and the sampler. With
    ``all_variants`` (on a GPU, where the ops run Triton kernels) more steps compile the kernels' other variants,
    which change only at thresholds on the step's size (``cinfer_ops.VARIANT_TOKEN_THRESHOLDS`` tokens): a decode
    step of ``max_batch`` sequences and a prefill step at each token threshold, or as large as a step gets
    (``max_num_tokens``, ``max_model_len`` a sequence). The decode attention kernel's tiling follows the batch
    only at its wave band: ``decode_batches`` (``cinfer_ops.paged_attention.decode_variant_batches``) adds a
    decode step of each batch it names, up to ``max_batch``."""
    steps = [[3, 2], [1, 1]]
    if all_variants:
        steps.append([1] * max_batch)
        steps += [[1] * b for b in decode_batches if 1 < b < max_batch]
        for threshold in sorted(set(cinfer_ops.VARIANT_TOKEN_THRESHOLDS)):
            tokens = min(threshold, max_num_tokens, max_batch * max_model_len)
            num_seqs = cdiv(tokens, max_model_len)
            q_lens = _spread(tokens, num_seqs)
            if q_lens not in steps:
                steps.append(q_lens)
    return steps


class ModelRunner:
    def __init__(self, paged_model, config: EngineConfig, device: torch.device, sampler: Sampler):
        """paged_model: ``graph_passes.PagedModel``, ``(input_ids [1, N], positions [1, N], meta) -> logits
        [batch, vocab]``, already bound to the KV caches."""
        self.model = paged_model
        self.config = config
        self.device = device
        self.sampler = sampler
        self.graphs: StepGraphs | None = None
        on_gpu = device.type == "cuda"
        use_graphs = on_gpu and not config.enforce_eager
        buckets = decode_buckets(config.max_num_seqs)
        # The warm-up runs two sequences whatever max_num_seqs is (one prefill- and one decode-shaped step).
        max_batch = max(buckets[-1] if use_graphs else config.max_num_seqs, 2)
        max_num_tokens = max(config.max_num_batched_tokens, max_batch)
        decode_batches = ()
        if on_gpu:
            _, _, kv_heads, head_dim = paged_model.k_caches[0].shape
            decode_batches = decode_variant_batches(max_batch, kv_heads, head_dim, device,
                                                    dtype=paged_model.k_caches[0].dtype)
        self._warm_up_steps = warm_up_steps(max_batch, max_num_tokens, config.max_model_len, all_variants=on_gpu,
                                            decode_batches=decode_batches)
        # One sequence more than any step has: the prefill CUDA graphs' padding (StepGraphs.prefill_batch).
        capacity = max_batch + 1
        self.host = StepBuffers.allocate(max_num_tokens, capacity, config.max_blocks_per_seq, torch.device("cpu"),
                                         pin_memory=on_gpu)
        # On CPU the model reads the host buffers directly: nothing to copy. Launched steps alternate between two
        # host sets, so then the model reads a set of its own, on CPU too (the same code path as on a GPU).
        self.dev = (StepBuffers.allocate(max_num_tokens, capacity, config.max_blocks_per_seq, device)
                    if on_gpu or config.async_scheduling else self.host)
        self._np = _numpy_views(self.host)
        self._staging = ([HostStaging.allocate(max_num_tokens, capacity, config.max_blocks_per_seq, on_gpu)
                          for _ in range(2)] if config.async_scheduling else [])
        self._num_launched = 0
        if use_graphs:
            self.graphs = StepGraphs(buckets, prefill_buckets(max_num_tokens), capacity)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run dummy steps (``warm_up_steps``) through the model and the sampler: the first compiles the model (so
        a model the graph passes cannot rewrite fails here) and the sampler's kernels; on a GPU the others compile
        the remaining Triton kernel variants, so that none compiles while serving or capturing CUDA graphs.

        On a GPU the model runs them under ``cinfer_ops.launch.compile_ahead``: cinfer's kernel variants compile in
        parallel rather than one by one at their first launch, and none of its kernels runs, so the logits are
        unwritten; the sampler's warm-up calls then get zeros of their shape instead."""
        with compile_ahead(self.device):
            steps = []
            for q_lens in self._warm_up_steps:
                self._fill_dummy(q_lens)
                steps.append((q_lens, self.model(*self.dev.model_inputs(sum(q_lens), len(q_lens)))))
        greedy = SamplingRow(SamplingParams(temperature=0.0), 0, 0, [0])
        rows = [greedy, SamplingRow(SamplingParams(temperature=1.0, top_k=8, top_p=0.9, min_p=0.01), 0, 0, [0])]
        for q_lens, logits in steps:
            if self.device.type == "cuda":
                logits = torch.zeros_like(logits)
            step_rows = rows[:len(q_lens)]  # a long warm-up step may be one sequence
            self.sampler(logits[:len(step_rows)], step_rows).tolist()
            self.sampler(logits[:1], [greedy]).tolist()  # the all-greedy path (argmax of the raw logits)

    @torch.no_grad()
    def profile_run(self) -> None:
        """What the engine measures to size the KV cache (``kv_cache.measure_peak_memory``): the warm-up, then
        what the warm-up does not run but serving may. The largest step: ``min(max_num_batched_tokens,
        max_num_seqs * max_model_len)`` tokens in full-length made-up sequences (the warm-up's largest step stops
        at the kernels' token thresholds), writing nowhere. The sampler's largest call: ``max_num_seqs`` rows with
        every filter and a repetition penalty, whose fp32 copies and sort of ``[rows, vocab]`` can outweigh a
        step's activations (the warm-up samples two rows at most)."""
        self.warm_up()
        config = self.config
        tokens = min(config.max_num_batched_tokens, config.max_num_seqs * config.max_model_len)
        q_lens = [min(config.max_model_len, tokens - start) for start in range(0, tokens, config.max_model_len)]
        self._fill_dummy(q_lens)
        logits = self.model(*self.dev.model_inputs(tokens, len(q_lens)))
        rows = config.max_num_seqs
        params = SamplingParams(temperature=1.0, top_k=8, top_p=0.9, min_p=0.01, repetition_penalty=1.1)
        logits = torch.zeros(rows, logits.shape[-1], dtype=logits.dtype, device=logits.device)
        self.sampler(logits, [SamplingRow(params, 0, 0, [0])] * rows).tolist()

    @torch.no_grad()
    def capture_graphs(self) -> None:
        assert self.graphs is not None
        self.graphs.capture(prepare=lambda tokens, batch: self._fill_dummy(_spread(tokens, batch)),
                            run=lambda tokens, batch: self.model(*self.dev.model_inputs(tokens, batch)))

    def _fill_dummy(self, q_lens: list[int]) -> None:
        """Fill the buffers with a step of made-up sequences (context = their new tokens, all in block 0) that
        writes nothing to the caches (slot -1)."""
        a = self._np
        batch, num_tokens = len(q_lens), sum(q_lens)
        a["query_start_loc"][0] = 0
        np.cumsum(q_lens, out=a["query_start_loc"][1:batch + 1])
        a["seq_lens"][:batch] = q_lens
        a["logits_indices"][:batch] = a["query_start_loc"][1:batch + 1] - 1
        a["block_tables"][:batch] = 0
        a["input_ids"][:num_tokens] = 0
        a["positions"][:num_tokens] = np.concatenate([np.arange(n) for n in q_lens])
        a["slot_mapping"][:num_tokens] = -1
        if self.dev is not self.host:
            self.dev.copy_(self.host, num_tokens, batch)

    @torch.no_grad()
    def execute(self, out: SchedulerOutput) -> list[int]:
        """Run one step; returns the sampled token of each request with ``out.samples[i]``, in order."""
        assert not out.input_tokens_in_flight, "a step continuing an in-flight one must be launched"
        num_tokens, batch = self._prepare(out)
        shape = self._copy_inputs(out, num_tokens, batch, self.host, self._np)
        logits = self._run_model(out, num_tokens, batch, shape)
        return self._sample(out, logits, batch).tolist()

    @torch.no_grad()
    def launch(self, out: SchedulerOutput, prev: InFlightStep | None = None) -> InFlightStep:
        """Start one step on the device and return without waiting for its tokens. ``prev``: the step still in
        flight, which ``out`` (from ``Scheduler.schedule_continuation``) continues: each request's input token
        is the one ``prev`` is sampling for it, copied on the device. Its sampled tokens go to pinned host memory
        behind an event; ``InFlightStep.token_ids()`` waits for them."""
        assert out.input_tokens_in_flight == (prev is not None)
        staging = self._staging[self._num_launched % 2]
        # Two sets suffice because at most one step is in flight and its tokens are read before the step after
        # next is launched. The event makes that safe even if it were not: the host must not refill pinned
        # buffers that a queued copy still reads (inputs) or writes (tokens).
        assert not staging.in_use, "a host buffer set was refilled before its step's tokens were read"
        if staging.done is not None:
            staging.done.synchronize()
        self._num_launched += 1
        num_tokens, batch = self._prepare(out, staging.arrays)
        shape = self._copy_inputs(out, num_tokens, batch, staging.buffers, staging.arrays)
        if prev is not None:
            self._copy_in_flight_tokens(out, prev)
        logits = self._run_model(out, num_tokens, batch, shape)
        sampled = self._sample(out, logits, batch)
        staging.sampled_token_ids[:sampled.shape[0]].copy_(sampled, non_blocking=True)
        if staging.done is not None:
            staging.done.record()
        staging.in_use = True
        return InFlightStep(out, sampled, staging)

    def _copy_in_flight_tokens(self, out: SchedulerOutput, prev: InFlightStep) -> None:
        """Input token of each request of ``out`` := the token ``prev`` sampled for it, on the device (queued
        after the host-to-device copies of ``out``'s inputs, which carry placeholders there)."""
        batch = len(out.seqs)
        sampling = [s for s, samples in zip(prev.out.seqs, prev.out.samples) if samples]
        if sampling[:batch] == out.seqs:  # the steady state: nobody left between the two steps
            self.dev.input_ids[:batch].copy_(prev.sampled_token_ids[:batch])
            return
        row_of = {seq: i for i, seq in enumerate(sampling)}
        index = torch.tensor([row_of[s] for s in out.seqs], dtype=torch.int64)
        if self.device.type == "cuda":
            # The caching host allocator keeps a pinned tensor alive until the copy queued from it has run.
            index = index.pin_memory()
        index = index.to(self.device, non_blocking=True)
        self.dev.input_ids[:batch].copy_(prev.sampled_token_ids[index])

    def _copy_inputs(self, out: SchedulerOutput, num_tokens: int, batch: int, host: StepBuffers,
                     arrays: dict[str, np.ndarray]) -> tuple[int, int] | None:
        """Copy the step's inputs from ``host`` (whose numpy views are ``arrays``) to the device buffers, padded to
        the shape of the CUDA graph that will replay; returns that (tokens, batch) shape, or None for a step that
        runs the compiled model directly."""
        shape = None if self.graphs is None else self.graphs.shape_for(num_tokens, batch, out.is_decode)
        if shape is not None:
            self._pad(num_tokens, batch, *shape, arrays)
            self.dev.copy_(host, *shape)
            return shape
        # PagedModel itself pads dims of size 1 (Dynamo's 0/1 specialisation): no padding needed here
        if self.dev is not host:
            self.dev.copy_(host, num_tokens, batch)
        return None

    def _run_model(self, out: SchedulerOutput, num_tokens: int, batch: int, shape: tuple[int, int] | None) -> Tensor:
        """Logits ``[>= batch, vocab]`` of the step in the device buffers: the shape's graph, or the model."""
        if shape is not None:
            return self.graphs.replay(shape, out.is_decode)
        return self.model(*self.dev.model_inputs(num_tokens, batch))

    def _sample(self, out: SchedulerOutput, logits: Tensor, batch: int) -> Tensor:
        """int64 [number of requests that sample] on the device, without synchronising with the host."""
        # Seeded draws use (seed, tokens generated so far), which counts the in-flight token if there is one.
        in_flight = int(out.input_tokens_in_flight)
        rows = [SamplingRow(s.params, s.seed, s.num_output_tokens + in_flight, s.token_ids)
                for s, samples in zip(out.seqs, out.samples) if samples]
        if not rows:
            return torch.empty(0, dtype=torch.int64, device=logits.device)
        if len(rows) == batch:
            logits = logits[:batch]
        else:  # mid-prompt chunks have logits too, but nothing to sample
            index = [i for i, samples in enumerate(out.samples) if samples]
            logits = logits[torch.tensor(index, dtype=torch.int64).to(logits.device, non_blocking=True)]
        return self.sampler(logits, rows)

    def _prepare(self, out: SchedulerOutput, arrays: dict[str, np.ndarray] | None = None) -> tuple[int, int]:
        """Fill the live prefixes of the host buffers (``arrays``: numpy views; default ``self.host``'s) for
        ``out``; returns (num_tokens, batch). With ``out.input_tokens_in_flight`` the input tokens are
        placeholders (zeros) and each request's position is that of the token in flight, ``num_tokens``."""
        a = self._np if arrays is None else arrays
        batch = len(out.seqs)
        block_size = self.config.block_size
        starts = np.fromiter((s.num_tokens if out.input_tokens_in_flight else s.num_computed_tokens
                              for s in out.seqs), dtype=np.int64, count=batch)
        qsl = a["query_start_loc"]
        qsl[0] = 0
        np.cumsum(out.num_new_tokens, out=qsl[1:batch + 1])
        num_tokens = int(qsl[batch])
        a["seq_lens"][:batch] = starts + out.num_new_tokens
        a["logits_indices"][:batch] = qsl[1:batch + 1] - 1
        ids, pos = a["input_ids"][:num_tokens], a["positions"][:num_tokens]
        if out.input_tokens_in_flight:  # one token per request, known only on the device
            ids[:] = 0
            pos[:] = starts
            seq_of_token = np.arange(batch)
        elif num_tokens == batch:  # one token per request (decode, or 1-token prompt chunks)
            ids[:] = [s.token_ids[start] for s, start in zip(out.seqs, starts.tolist())]
            pos[:] = starts
            seq_of_token = np.arange(batch)
        else:
            ids[:] = list(chain.from_iterable(s.token_ids[start:start + n] for s, start, n in
                                              zip(out.seqs, starts.tolist(), out.num_new_tokens)))
            seq_of_token = np.repeat(np.arange(batch), out.num_new_tokens)
            # position = start of its request + offset inside the step's chunk
            np.subtract(np.arange(num_tokens), qsl[seq_of_token] - starts[seq_of_token], out=pos)
        tables = a["block_tables"]
        for i, table in enumerate(out.block_tables):
            tables[i, :len(table)] = table
        block_of_token = tables[seq_of_token, pos // block_size]
        np.add(block_of_token * block_size, pos % block_size, out=a["slot_mapping"][:num_tokens])
        return num_tokens, batch

    def _pad(self, num_tokens: int, batch: int, padded_tokens: int, padded_batch: int,
             arrays: dict[str, np.ndarray] | None = None) -> None:
        """Padding tokens write nowhere (slot -1); padding sequences have no new tokens and no context."""
        a = self._np if arrays is None else arrays
        a["input_ids"][num_tokens:padded_tokens] = 0
        a["positions"][num_tokens:padded_tokens] = 0
        a["slot_mapping"][num_tokens:padded_tokens] = -1
        a["seq_lens"][batch:padded_batch] = 0
        a["query_start_loc"][batch + 1:padded_batch + 1] = num_tokens
        a["logits_indices"][batch:padded_batch] = max(num_tokens - 1, 0)
