"""``SamplingParams``: how one request is decoded (the runtime API's public parameter object).

Validation happens once, at construction, so the engine and the sampler can trust every field. Numeric fields are
normalised to plain ``int`` / ``float`` (numpy scalars and ``int`` temperatures are accepted) and
``stop_token_ids`` to a list.
"""
import math
import numbers
from dataclasses import dataclass


def _as_int(name: str, value) -> int:
    # bool is an Integral, but True as a token budget or top_k is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"SamplingParams.{name} must be an int, got {value!r}")
    return int(value)


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"SamplingParams.{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be finite, got {value!r}")
    return value


@dataclass
class SamplingParams:
    """Decoding parameters of one request; the semantics are those of HF ``generate``'s logits processors.

    max_tokens: generated tokens at most (>= 1). temperature: 0 means greedy (argmax), and then top_k, top_p and
    min_p are ignored. top_k: keep the k most likely tokens (-1: all). top_p: keep the smallest set of most likely
    tokens whose probability reaches top_p (1: all). min_p: drop tokens less likely than min_p times the most
    likely one (0: none). repetition_penalty: HF's, over the prompt and generated tokens (1: off). seed: makes
    the request's tokens reproducible, independently of what else is batched with it (None: the engine draws one).
    stop_token_ids: generation stops after any of them. ignore_eos: keep going past the model's EOS token.
    """
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.max_tokens = _as_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        self.temperature = _as_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        self.top_p = _as_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        self.min_p = _as_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
                raise ValueError(f"SamplingParams.stop_token_ids must be a list of token ids, "
                                 f"got {self.stop_token_ids!r}")
            ids = [_as_int("stop_token_ids", t) for t in self.stop_token_ids]
            if any(t < 0 for t in ids):
                raise ValueError(f"SamplingParams.stop_token_ids must be non-negative, got {ids}")
            self.stop_token_ids = ids
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0)."""
        return self.temperature == 0
