"""CUDA graphs for decode steps: one per batch-size bucket, captured once, replayed every decode step.

A decode step of ``batch`` requests runs the graph of the smallest bucket >= batch; the runner pads the step's
static buffers to the bucket (padding tokens write slot -1, padding sequences have no new tokens), so replaying
over refilled buffers is the whole step. All graphs share one memory pool: they never run concurrently, and
capturing the largest first lets the smaller ones reuse its blocks.
"""
import logging
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger("cinfer")


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to 64 and of 16 beyond; the last bucket is the first >= max_num_seqs."""
    buckets = []
    size = 1
    while True:
        buckets.append(size)
        if size >= max_num_seqs:
            return buckets
        size = size * 2 if size < 8 else size + (8 if size < 64 else 16)


class DecodeGraphs:
    def __init__(self, buckets: list[int]):
        self.buckets = sorted(buckets)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, Tensor] = {}
        self.num_replays = 0

    def bucket_for(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} exceeds the largest decode bucket {self.buckets[-1]}")

    def capture(self, prepare: Callable[[int], None], run: Callable[[int], Tensor]) -> None:
        """``prepare(bucket)`` fills the static buffers with a step of ``bucket`` sequences (outside the capture, so
        no host-to-device copy is recorded); ``run(bucket)`` runs the model over them and returns its logits
        ``[bucket, vocab]``. Each bucket runs once eagerly first: compilation, lazy initialisation and allocator
        warm-up must not happen inside a capture."""
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            prepare(bucket)
            run(bucket)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[bucket] = run(bucket)
            self._graphs[bucket] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def replay(self, bucket: int) -> Tensor:
        """Replays the bucket's graph; returns its static logits ``[bucket, vocab]`` (overwritten by the next replay)."""
        self._graphs[bucket].replay()
        self.num_replays += 1
        return self._logits[bucket]
