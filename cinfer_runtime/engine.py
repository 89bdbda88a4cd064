"""``compile(model) -> Engine``: the runtime's front door.

``Engine.step()`` is the whole loop: ``Scheduler.schedule()`` -> ``ModelRunner.execute()`` -> ``Scheduler.update()``.
Everything a request can get wrong (prompt, token ids, length, sampling parameters) is checked when it is
submitted, before it touches the scheduler, so a bad request never disturbs the others.

Async scheduling (``compile(..., async_scheduling=...)``, on by default for a model on a GPU): a step is launched on the device and
left in flight; the next ``step()`` first launches its successor when the scheduler can tell it without the
in-flight tokens (``Scheduler.schedule_continuation``: the steady decode state), then reads the in-flight tokens and
updates the scheduler, so the device never waits for the host between decode steps. Anything else (new or
preempted requests to prefill, a partly prefilled prompt, no blocks without preempting, a repetition penalty)
reads the in-flight tokens first and schedules as usual. Each ``step()`` thus returns the tokens of the step the
previous call launched (the first call launches and returns nothing); tokens, finish reasons and their order
per request are those of the synchronous engine.
"""
import functools
import logging
import numbers
import random
import time
from collections import deque
from collections.abc import Iterator, Sequence as SequenceABC
from dataclasses import replace

import torch
from tqdm.auto import tqdm

import graph_passes
from cinfer_runtime.block_manager import BlockManager
from cinfer_runtime.config import EngineConfig, cdiv
from cinfer_runtime.kv_cache import (PROFILE_NUM_KV_BLOCKS, DeviceMemory, KVCacheSpec, allocate_kv_caches,
                                     cpu_num_kv_blocks, gpu_reserve_bytes, log_kv_cache, measure_peak_memory,
                                     num_kv_blocks_from_memory, sizes_from_device_memory)
from cinfer_runtime.model_runner import InFlightStep, ModelRunner
from cinfer_runtime.outputs import RequestOutput
from cinfer_runtime.sampler import Sampler
from cinfer_runtime.sampling_params import SamplingParams
from cinfer_runtime.scheduler import Scheduler, SchedulerOutput
from cinfer_runtime.sequence import Sequence

logger = logging.getLogger("cinfer")


def compile(model: torch.nn.Module, *, tokenizer=None, block_size: int = 16, num_kv_blocks: int | None = None,
            gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
            max_model_len: int | None = None, enforce_eager: bool = False, enable_chunked_prefill: bool = True,
            seed: int = 0, inner_backend: str = "inductor", async_scheduling: bool | None = None,
            enable_prefix_caching: bool = True) -> "Engine":
    """Compile an unmodified HF causal LM (e.g. ``LlamaForCausalLM``) into a batched-generation engine.

    Allocates the paged KV cache (``num_kv_blocks`` blocks of ``block_size`` tokens), rewrites and compiles the model
    over it, runs warm-up steps (a model the graph passes cannot rewrite raises ``graph_passes.GraphRewriteError``
    here; on a GPU they also compile every variant of the Triton kernels, so that none compiles while serving) and,
    on a GPU unless ``enforce_eager``, captures CUDA graphs for decode steps and for prefill steps of up to
    ``cuda_graphs.PREFILL_GRAPH_MAX_TOKENS`` tokens. ``num_kv_blocks=None`` on a GPU runs the
    warm-up, the largest step (up to ``max_num_batched_tokens`` tokens) and the largest sampling over a few
    blocks, measuring their peak memory; the cache then gets what is left of ``gpu_memory_utilization`` of the
    card (RuntimeError if nothing is; ``kv_cache.num_kv_blocks_from_memory``). On CPU it holds a few full-length
    sequences. ``inner_backend`` is what compiles the rewritten graph (``"inductor"``, or ``"eager"`` for
    a fast compile). ``seed`` draws the seeds of requests whose ``SamplingParams.seed`` is None.
    ``async_scheduling`` overlaps consecutive decode steps (see the module docstring); outputs are unchanged. None
    (the default) turns it on for a model on a GPU, where it removes the device's idle time between decode steps
    (1.15x output tokens/s at batch 16 and 64 on an H100, benchmarks/RESULTS.md), and off on CPU, where nothing
    runs asynchronously. ``enable_prefix_caching`` lets a request reuse the KV blocks of a prompt prefix computed
    before (by another request, or by itself before a preemption) instead of recomputing them; outputs are unchanged
    up to floating-point summation order.
    """
    if async_scheduling is None:
        async_scheduling = next(model.parameters()).device.type == "cuda"
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                          gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                          enforce_eager=enforce_eager, enable_chunked_prefill=enable_chunked_prefill, seed=seed,
                          inner_backend=inner_backend, async_scheduling=async_scheduling,
                          enable_prefix_caching=enable_prefix_caching)
    return Engine(model, config, tokenizer=tokenizer)


class Engine:
    def __init__(self, model: torch.nn.Module, config: EngineConfig, tokenizer=None):
        text_config = model.config.get_text_config()
        model_max_len = text_config.max_position_embeddings
        window = graph_passes.attention_window(text_config)
        if window is not None and window < model_max_len:
            # Within the window, sliding-window attention is full causal attention, which is what the op computes.
            logger.warning("%s attends over a sliding window of %d tokens: max_model_len is capped there",
                           type(model).__name__, window)
            model_max_len = window
        config = config.resolve(model_max_len)
        self.device = next(model.parameters()).device
        # On a GPU with no num_kv_blocks given, the cache is sized from the memory the warm-up measured: until then
        # the model runs over a few blocks (ModelRunner.profile_run, _num_kv_blocks_from, _rebind_kv_cache).
        profile = sizes_from_device_memory(config, self.device)
        if profile:
            config = replace(config, num_kv_blocks=PROFILE_NUM_KV_BLOCKS)
        elif config.num_kv_blocks is None:
            config = replace(config, num_kv_blocks=cpu_num_kv_blocks(model, config))
        self.config = config
        self.tokenizer = tokenizer
        # What an output's text is decoded with when read (RequestOutput): the tokenizer's own method, not one of
        # the engine's, so that outputs kept after the engine is dropped do not keep it (and its caches) alive.
        self._decode = (functools.partial(tokenizer.decode, skip_special_tokens=True)
                        if tokenizer is not None else None)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = _eos_token_ids(model)
        model.eval()

        spec = KVCacheSpec.from_model(model)
        self.k_caches, self.v_caches = allocate_kv_caches(spec, config.num_kv_blocks, config.block_size, self.device)
        self.paged_model = graph_passes.compile_model(model, self.k_caches, self.v_caches,
                                                      inner_backend=config.inner_backend)
        logits_size = model.get_output_embeddings().weight.shape[0]
        sampler = Sampler(logits_size, self.device, max(config.max_num_seqs, 2))
        self.runner = ModelRunner(self.paged_model, config, self.device, sampler)
        # Start-up phases in seconds: the warm-up steps (Dynamo capture, graph passes, Inductor, Triton kernels) and
        # graph capture.
        self.startup_times: dict[str, float] = {}
        start = time.perf_counter()
        if profile:
            memory = measure_peak_memory(self.device, self.runner.profile_run)
        else:
            self.runner.warm_up()
        self.startup_times["compile_s"] = time.perf_counter() - start
        self.startup_times.update(self.paged_model.compile_times)  # parts of compile_s
        if profile:
            self._rebind_kv_cache(spec, self._num_kv_blocks_from(memory, spec))
        config = self.config
        log_kv_cache(spec, config.num_kv_blocks, config.block_size)
        if self.runner.graphs is not None:  # captured over the final caches: a graph keeps the addresses it saw
            start = time.perf_counter()
            self.runner.capture_graphs()
            self.startup_times["cuda_graphs_s"] = time.perf_counter() - start
        logger.info("start-up: %s", ", ".join(f"{k} {v:.1f}" for k, v in self.startup_times.items()))
        self.scheduler = Scheduler(config, BlockManager(config.num_kv_blocks, config.block_size,
                                                        enable_prefix_caching=config.enable_prefix_caching))

        self._rng = random.Random(config.seed)
        self._next_seq_id = 0
        self._requests: dict[str, Sequence] = {}     # unfinished requests by id
        # Outputs go to the request's owner, whoever stepped the engine: a suspended stream() keeps its own queue;
        # add_request() requests get theirs from the next step().
        self._undelivered: list[RequestOutput] = []
        self._stream_queues: dict[str, deque[RequestOutput]] = {}
        self._in_flight: InFlightStep | None = None  # async scheduling: the launched step whose tokens are unread
        self.num_overlapped_steps = 0                # async scheduling: steps launched before their inputs were read

    # ------------------------------------------------------------------------------------------------ start-up
    def _num_kv_blocks_from(self, memory: DeviceMemory, spec: KVCacheSpec) -> int:
        """The cache's block count from the memory ``ModelRunner.profile_run`` measured (``num_kv_blocks_from_memory``)."""
        config = self.config
        lm_head = self.paged_model.model.get_output_embeddings().weight
        graphs = self.runner.graphs
        batches = [batch for _, batch in graphs.shapes] if graphs is not None else []
        reserve = gpu_reserve_bytes(batches, lm_head.shape[0] * lm_head.element_size())
        gib = 2 ** 30
        logger.info("KV cache budget: %.2f GiB (gpu_memory_utilization %s of %.2f GiB) - %.2f GiB outside torch - "
                    "%.2f GiB torch peak in the warm-up - %.2f GiB reserve",
                    memory.total * config.gpu_memory_utilization / gib, config.gpu_memory_utilization,
                    memory.total / gib, memory.non_torch / gib, memory.torch_peak / gib, reserve / gib)
        return num_kv_blocks_from_memory(memory, config.gpu_memory_utilization, reserve,
                                         spec.bytes_per_block(config.block_size))

    def _rebind_kv_cache(self, spec: KVCacheSpec, num_kv_blocks: int) -> None:
        """Replace the caches the warm-up ran over by NaN-filled ones of ``num_kv_blocks`` blocks, before anything
        holds their addresses (CUDA graphs) or their size (the block manager). The compiled graph takes the
        caches as inputs with a symbolic block count, so it runs on the new ones without recompiling."""
        config = replace(self.config, num_kv_blocks=num_kv_blocks)
        # The old caches are freed when the model lets go of them; while both exist the budget still holds, since
        # the measured peak counted the old ones.
        self.k_caches, self.v_caches = allocate_kv_caches(spec, num_kv_blocks, config.block_size, self.device)
        self.paged_model.set_caches(self.k_caches, self.v_caches)
        self.config = config
        self.runner.config = config  # the runner reads no block count today; keep it from seeing a stale one

    # ----------------------------------------------------------------------------------------------- requests
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one request: ``prompt`` is a list of token ids, or a string when the engine has a tokenizer.
        Returns its request id. Raises (and queues nothing) on bad input."""
        seq = self._make_sequence(prompt, params, request_id)
        self._submit([seq])
        return seq.request_id

    def has_unfinished_requests(self) -> bool:
        """True while a request is unfinished or an output is still waiting for ``step()`` to return it."""
        return self.scheduler.has_unfinished() or bool(self._undelivered)

    def abort_request(self, request_id: str) -> None:
        seq = self._requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.abort(seq)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns an output (cumulative tokens) for every request that got a token,
        plus any that advanced during an earlier ``generate``/``stream`` call they were not part of. Requests of
        an open ``stream()`` are left to it. With async scheduling the tokens are those of the step launched by
        the previous call."""
        for seq in self._step():
            self._deliver(seq)
        outputs, self._undelivered = self._undelivered, []
        return outputs

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (token-id lists, or strings with a tokenizer) and return the finished outputs
        in prompt order. ``sampling_params``: one for all prompts, or one per prompt. Raises before any work on
        bad input. Requests added earlier with ``add_request`` keep running alongside; their outputs are
        returned by the next ``step()``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, SequenceABC):
            raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts: pass one "
                                 f"SamplingParams for all, or exactly one per prompt")
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, params_list)]
        self._submit(seqs)

        mine = {seq.request_id: i for i, seq in enumerate(seqs)}
        results: list[RequestOutput | None] = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        start, num_generated = time.perf_counter(), 0
        try:
            while any(r is None for r in results):
                advanced = self._step()
                num_generated += len(advanced)
                for seq in advanced:
                    index = mine.get(seq.request_id)
                    if index is None:
                        self._deliver(seq)
                    elif seq.is_finished:
                        results[index] = self._output(seq)
                        bar.update(1)
                bar.set_postfix_str(f"{num_generated / (time.perf_counter() - start):.0f} tok/s", refresh=False)
        except BaseException:
            for seq in seqs:
                self.abort_request(seq.request_id)
            raise
        finally:
            bar.close()
        return results

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Submit one request (validated now) and return an iterator that yields its output (cumulative tokens)
        each time it gets a token, the last one finished. Closing the iterator early aborts the request."""
        seq = self._make_sequence(prompt, params)
        self._submit([seq])
        self._stream_queues[seq.request_id] = deque()
        return _RequestStream(self, seq)

    def _stream(self, seq: Sequence) -> Iterator[RequestOutput]:
        queue = self._stream_queues[seq.request_id]
        try:
            while True:
                while queue:  # a whole step is routed before anything is yielded: closing here loses nothing
                    yield queue.popleft()
                if seq.is_finished:
                    return
                for advanced in self._step():
                    self._deliver(advanced)
        finally:
            self._close_stream(seq)

    def _close_stream(self, seq: Sequence) -> None:
        """The stream of ``seq`` is done or closed (idempotent): stop routing to it, abort it if unfinished."""
        self._stream_queues.pop(seq.request_id, None)
        if not seq.is_finished:
            self.abort_request(seq.request_id)

    def _deliver(self, seq: Sequence) -> None:
        """Hand an output of a request the current caller does not own to its owner."""
        queue = self._stream_queues.get(seq.request_id)
        (queue.append if queue is not None else self._undelivered.append)(self._output(seq))

    # --------------------------------------------------------------------------------------------- internals
    def _step(self) -> list[Sequence]:
        if self.config.async_scheduling:
            return self._step_overlapped()
        out = self.scheduler.schedule()
        if not out.seqs:
            return []
        sampled = self.runner.execute(out)
        return self._update(out, sampled)

    def _step_overlapped(self) -> list[Sequence]:
        """Async scheduling: launch the next step, then apply the one in flight; returns the requests that
        advanced in it. At most one step is left in flight."""
        prev, self._in_flight = self._in_flight, None
        if prev is None:
            advanced = []
        else:
            next_out = self.scheduler.schedule_continuation(prev.out)
            if next_out is not None:  # launched before prev's tokens reach the host
                self._in_flight = self.runner.launch(next_out, prev)
                self.num_overlapped_steps += 1
            advanced = self._update(prev.out, prev.token_ids())
            if self._in_flight is not None and all(s.is_finished for s in self._in_flight.out.seqs):
                # Every request of the launched step stopped in prev: nothing left to wait for but its tokens.
                dead, self._in_flight = self._in_flight, None
                self._update(dead.out, dead.token_ids())
        if self._in_flight is None:
            out = self.scheduler.schedule()
            if out.seqs:
                self._in_flight = self.runner.launch(out)
        return advanced

    def _update(self, out: SchedulerOutput, sampled: list[int]) -> list[Sequence]:
        advanced = self.scheduler.update(out, sampled)
        for seq in advanced:
            if seq.is_finished:
                self._requests.pop(seq.request_id, None)
        return advanced

    def _submit(self, seqs: list[Sequence]) -> None:
        ids = [s.request_id for s in seqs]
        clash = [i for i in ids if i in self._requests] or ([i for i in ids if ids.count(i) > 1])
        if clash:
            raise ValueError(f"request id {clash[0]!r} is already in use")
        for seq in seqs:
            self._requests[seq.request_id] = seq
            self.scheduler.add(seq)

    def _make_sequence(self, prompt, params: SamplingParams | None, request_id: str | None = None) -> Sequence:
        """Validate one request and build its (not yet queued) Sequence."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        prompt_ids = self._prompt_token_ids(prompt)
        max_model_len = self.config.max_model_len
        if len(prompt_ids) > max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, more than max_model_len={max_model_len}")
        # The K/V of every token but the last sampled one is cached: the request must fit the cache on its own,
        # else the oldest request could never finish.
        cached_tokens = min(len(prompt_ids) + params.max_tokens - 1, max_model_len)
        capacity = self.config.num_kv_blocks * self.config.block_size
        if cdiv(cached_tokens, self.config.block_size) > self.config.num_kv_blocks:
            raise ValueError(f"request needs up to {cached_tokens} tokens of KV cache but the cache holds "
                             f"{capacity}: shorten the prompt or max_tokens, or give the cache more blocks")
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        stop = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop.update(self.eos_token_ids)
        return Sequence(seq_id=seq_id, request_id=str(seq_id) if request_id is None else str(request_id),
                        prompt_token_ids=prompt_ids, params=params,
                        seed=params.seed if params.seed is not None else self._rng.getrandbits(63),
                        stop_token_ids=frozenset(stop))

    def _prompt_token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("a string prompt needs a tokenizer: pass tokenizer= to cinfer_runtime.compile, "
                                "or give the prompt as a list of token ids")
            prompt = self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, SequenceABC) or isinstance(prompt, (str, bytes)):
            raise TypeError(f"a prompt must be a list of token ids or a string, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if type(prompt) is list and all(type(t) is int for t in prompt) and 0 <= min(prompt) <= max(prompt) < \
                self.vocab_size:
            return list(prompt)  # the common case, checked in bulk (a tenth of the per-token checks' time)
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"prompt token ids must be ints, got {t!r}")
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt token id {t} is outside the vocabulary [0, {self.vocab_size})")
        return [int(t) for t in prompt]

    def _output(self, seq: Sequence) -> RequestOutput:
        """A request's output now. Its text is decoded when read (RequestOutput); its prompt ids are one copy per
        request, shared by all its outputs (the sequence's own list stays private)."""
        if seq.output_prompt_token_ids is None:
            seq.output_prompt_token_ids = list(seq.prompt_token_ids)
        return RequestOutput(seq.request_id, seq.output_prompt_token_ids, seq.output_token_ids,
                             finish_reason=seq.finish_reason, detokenize=self._decode)


def _eos_token_ids(model: torch.nn.Module) -> frozenset[int]:
    """EOS ids from the model's generation config (int, list or None), else from its config."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class _RequestStream:
    """The iterator ``Engine.stream`` returns. A plain generator's ``finally`` never runs when it is closed or dropped
    before its first ``next()``; this wrapper aborts the request in that case too."""

    def __init__(self, engine: Engine, seq: Sequence):
        self._engine, self._seq = engine, seq
        self._outputs = engine._stream(seq)

    def __iter__(self) -> "_RequestStream":
        return self

    def __next__(self) -> RequestOutput:
        return next(self._outputs)

    def close(self) -> None:
        self._outputs.close()
        self._engine._close_stream(self._seq)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to abort
            pass
