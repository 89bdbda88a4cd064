"""Turns a ``SchedulerOutput`` into one run of the compiled model and the sampler, returning the sampled tokens.

The step's tokens are flattened into one row ``[1, num_tokens]``; their positions and attention metadata go into
buffers allocated once (static addresses, which CUDA graphs need). On a GPU each buffer has a pinned host twin:
the step is assembled there with numpy, then copied with non-blocking copies, so the only host/device
synchronisation of a step is reading the sampled tokens back.
"""
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from cinfer_runtime.config import EngineConfig
from cinfer_runtime.cuda_graphs import DecodeGraphs, decode_buckets
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


class ModelRunner:
    def __init__(self, paged_model, config: EngineConfig, device: torch.device, sampler: Sampler):
        """paged_model: ``graph_passes.PagedModel``, ``(input_ids [1, N], positions [1, N], meta) -> logits
        [batch, vocab]``, already bound to the KV caches."""
        self.model = paged_model
        self.config = config
        self.device = device
        self.sampler = sampler
        self.graphs: DecodeGraphs | None = None
        use_graphs = device.type == "cuda" and not config.enforce_eager
        buckets = decode_buckets(config.max_num_seqs)
        # The warm-up runs two sequences whatever max_num_seqs is (one prefill- and one decode-shaped step).
        max_batch = max(buckets[-1] if use_graphs else config.max_num_seqs, 2)
        max_num_tokens = max(config.max_num_batched_tokens, max_batch)
        on_gpu = device.type == "cuda"
        self.host = StepBuffers.allocate(max_num_tokens, max_batch, config.max_blocks_per_seq, torch.device("cpu"),
                                         pin_memory=on_gpu)
        # On CPU the model reads the host buffers directly: nothing to copy.
        self.dev = (StepBuffers.allocate(max_num_tokens, max_batch, config.max_blocks_per_seq, device)
                    if on_gpu else self.host)
        self._np = {name: getattr(self.host, name).numpy() for name in StepBuffers.__dataclass_fields__}
        if use_graphs:
            self.graphs = DecodeGraphs(buckets)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run a prefill-shaped and a decode-shaped dummy step through the model and the sampler: this compiles
        the model (so a model the graph passes cannot rewrite fails here) and the sampler's kernels."""
        for q_lens in ([3, 2], [1, 1]):
            self._fill_dummy(q_lens)
            logits = self.model(*self.dev.model_inputs(sum(q_lens), len(q_lens)))
            rows = [SamplingRow(SamplingParams(temperature=0.0), 0, 0, [0]),
                    SamplingRow(SamplingParams(temperature=1.0, top_k=8, top_p=0.9, min_p=0.01), 0, 0, [0])]
            self.sampler(logits[:2], rows).tolist()

    @torch.no_grad()
    def capture_decode_graphs(self) -> None:
        assert self.graphs is not None
        self.graphs.capture(prepare=lambda bucket: self._fill_dummy([1] * bucket),
                            run=lambda bucket: self.model(*self.dev.model_inputs(bucket, bucket)))

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
        num_tokens, batch = self._prepare(out)
        if self.graphs is not None and out.is_decode:
            bucket = self.graphs.bucket_for(batch)
            self._pad(num_tokens, batch, bucket, bucket)
            self.dev.copy_(self.host, bucket, bucket)
            logits = self.graphs.replay(bucket)
        else:  # PagedModel itself pads dims of size 1 (Dynamo's 0/1 specialisation): no padding needed here
            if self.dev is not self.host:
                self.dev.copy_(self.host, num_tokens, batch)
            logits = self.model(*self.dev.model_inputs(num_tokens, batch))
        rows = [SamplingRow(s.params, s.seed, s.num_output_tokens, s.token_ids)
                for s, samples in zip(out.seqs, out.samples) if samples]
        if not rows:
            return []
        if len(rows) == batch:
            logits = logits[:batch]
        else:  # mid-prompt chunks have logits too, but nothing to sample
            index = [i for i, samples in enumerate(out.samples) if samples]
            logits = logits[torch.tensor(index, dtype=torch.int64).to(logits.device, non_blocking=True)]
        return self.sampler(logits, rows).tolist()

    def _prepare(self, out: SchedulerOutput) -> tuple[int, int]:
        """Fill the host buffers' live prefixes for ``out``; returns (num_tokens, batch)."""
        a = self._np
        batch = len(out.seqs)
        block_size = self.config.block_size
        starts = np.fromiter((s.num_computed_tokens for s in out.seqs), dtype=np.int64, count=batch)
        qsl = a["query_start_loc"]
        qsl[0] = 0
        np.cumsum(out.num_new_tokens, out=qsl[1:batch + 1])
        num_tokens = int(qsl[batch])
        a["seq_lens"][:batch] = starts + out.num_new_tokens
        a["logits_indices"][:batch] = qsl[1:batch + 1] - 1
        ids, pos = a["input_ids"][:num_tokens], a["positions"][:num_tokens]
        if num_tokens == batch:  # one token per request (decode, or 1-token prompt chunks)
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

    def _pad(self, num_tokens: int, batch: int, padded_tokens: int, padded_batch: int) -> None:
        """Padding tokens write nowhere (slot -1); padding sequences have no new tokens and no context."""
        a = self._np
        a["input_ids"][num_tokens:padded_tokens] = 0
        a["positions"][num_tokens:padded_tokens] = 0
        a["slot_mapping"][num_tokens:padded_tokens] = -1
        a["seq_lens"][batch:padded_batch] = 0
        a["query_start_loc"][batch + 1:padded_batch + 1] = num_tokens
        a["logits_indices"][batch:padded_batch] = max(num_tokens - 1, 0)
