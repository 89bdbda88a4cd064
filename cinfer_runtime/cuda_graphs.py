"""CUDA graphs for steps: one per step shape, captured once at start-up, replayed whenever a step fits.

A step's shape is (tokens, sequences). Two kinds of shapes are captured:

- **decode**: ``batch`` sequences of one token each, for every batch-size bucket (``decode_buckets``);
- **prefill**: any mix of prompt chunks and decodes of at most ``PREFILL_GRAPH_MAX_TOKENS`` tokens, for every
  token bucket (``prefill_buckets``), each with room for ``min(tokens, max_batch)`` sequences (a step has at most
  one sequence per token).

Without a graph, a step pays the host cost of launching every kernel of the compiled model (about 25 ms for a
32-layer model, several times the device time of a 128-token prefill of an 8B model); a replay is one launch.
Larger steps run the compiled model directly: their device time dwarfs the launches.

The runner pads a step's static buffers to its graph's shape: padding tokens write nowhere (slot -1) and belong
to no sequence (they lie past ``query_start_loc[batch]``), padding sequences have no new tokens and no context.
The ops' kernels are chosen from shapes and read everything else on the device, so one capture serves every step
of its shape. All graphs share one memory pool: they never run concurrently, and capturing the largest first
lets the smaller ones reuse its blocks.
"""
import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger("cinfer")

# Prefill steps up to this many tokens replay a graph. At 1024 tokens an 8B model's step takes longer on the
# device than its launches take on the host, so larger graphs would only cost capture time and memory.
PREFILL_GRAPH_MAX_TOKENS = 1024
PREFILL_GRAPH_MIN_TOKENS = 16


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to 64 and of 16 beyond; the last bucket is the first >= max_num_seqs."""
    buckets = []
    size = 1
    while True:
        buckets.append(size)
        if size >= max_num_seqs:
            return buckets
        size = size * 2 if size < 8 else size + (8 if size < 64 else 16)


def prefill_buckets(max_num_tokens: int, limit: int = PREFILL_GRAPH_MAX_TOKENS) -> list[int]:
    """Token counts of the prefill graphs: powers of two from 16 and the halfway points 1.5x between them (so a
    step pads by less than half), up to ``min(limit, max_num_tokens)``, which is always the last bucket."""
    top = min(limit, max_num_tokens)
    buckets = []
    size = PREFILL_GRAPH_MIN_TOKENS
    while size < top:
        buckets.append(size)
        if size * 3 // 2 < top:
            buckets.append(size * 3 // 2)
        size *= 2
    return buckets + [top] if top >= PREFILL_GRAPH_MIN_TOKENS else []


class StepGraphs:
    def __init__(self, decode: list[int], prefill: list[int], max_batch: int):
        """``decode``: batch-size buckets; ``prefill``: token buckets; ``max_batch``: the static buffers' batch
        capacity (> every decode bucket, see ``prefill_batch``)."""
        assert max(decode) < max_batch
        self.decode = sorted(decode)
        self.prefill = sorted(prefill)
        self.max_batch = max_batch
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, int], Tensor] = {}
        self.num_replays: Counter[str] = Counter()  # by kind: "decode", "prefill"

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every captured (tokens, sequences) shape, largest first."""
        shapes = {(b, b) for b in self.decode} | {(t, self.prefill_batch(t)) for t in self.prefill}
        return sorted(shapes, reverse=True)

    def prefill_batch(self, tokens: int) -> int:
        """The batch a prefill graph of ``tokens`` tokens is captured at: room for every step that fits it, and
        never ``tokens`` itself. A step of as many tokens as sequences is a decode step to the ops (the decode
        kernel, and ``rope_paged_attention``'s RoPE folded into it, which needs at most one query token per
        sequence), so a prefill graph must not have that shape whatever step it replays."""
        return tokens + 1 if tokens < self.max_batch else self.max_batch - 1

    def shape_for(self, num_tokens: int, batch: int, is_decode: bool) -> tuple[int, int] | None:
        """The graph shape a step of ``num_tokens`` tokens over ``batch`` sequences pads to, or None (no graph:
        a prefill step above the largest token bucket)."""
        if is_decode:
            for size in self.decode:
                if size >= batch:
                    return size, size
            raise ValueError(f"batch {batch} exceeds the largest decode bucket {self.decode[-1]}")
        for size in self.prefill:
            if size >= num_tokens:
                padded_batch = self.prefill_batch(size)
                assert batch <= padded_batch, (batch, num_tokens, padded_batch)  # batch <= tokens, < max_batch
                return size, padded_batch
        return None

    def capture(self, prepare: Callable[[int, int], None], run: Callable[[int, int], Tensor]) -> None:
        """``prepare(tokens, batch)`` fills the static buffers with a step of that shape (outside the capture, so
        no host-to-device copy is recorded); ``run(tokens, batch)`` runs the model over them and returns its
        logits ``[batch, vocab]``. Each shape runs once eagerly first: compilation, lazy initialisation and
        allocator warm-up must not happen inside a capture."""
        pool = torch.cuda.graph_pool_handle()
        for shape in self.shapes:
            prepare(*shape)
            run(*shape)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[shape] = run(*shape)
            self._graphs[shape] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs: decode batch sizes %s, prefill token counts %s", self.decode,
                    self.prefill)

    def replay(self, shape: tuple[int, int], is_decode: bool) -> Tensor:
        """Replays the shape's graph; returns its static logits ``[batch, vocab]`` (overwritten by the next
        replay). ``is_decode`` says which kind of step ``num_replays`` counts."""
        self._graphs[shape].replay()
        self.num_replays["decode" if is_decode else "prefill"] += 1
        return self._logits[shape]
