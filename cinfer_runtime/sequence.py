"""One request's state as the scheduler sees it: its tokens, how many of them are in the KV cache, its status.

A step processes tokens ``token_ids[num_computed_tokens : num_computed_tokens + n]``; when that reaches the end
of ``token_ids`` the step also samples the next token. Prefill, chunked prefill, decode and the recompute of a
preempted request are all this one rule, so there is no "phase" flag to get out of sync.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cinfer_runtime.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # not holding blocks: new, or preempted (its KV is recomputed when it resumes)
    RUNNING = "running"      # holding blocks for its computed tokens
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int                 # engine-wide counter: also the arrival order the scheduler is FCFS over
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                   # params.seed, or one the engine drew for this request
    stop_token_ids: frozenset[int]  # params.stop_token_ids, plus the model's EOS ids unless params.ignore_eos
    token_ids: list[int] = field(init=False)   # prompt + output so far
    num_computed_tokens: int = 0               # leading tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None           # "stop" or "length" once finished
    num_preemptions: int = 0
    output_prompt_token_ids: list[int] | None = field(default=None, repr=False)  # the engine's outputs' copy

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
