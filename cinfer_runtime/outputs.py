"""What the engine hands back for a request: its tokens so far and, once finished, why it stopped."""
from typing import Callable


class RequestOutput:
    """One request's output: ``request_id``, ``prompt_token_ids``, ``token_ids`` (generated only, prompt excluded,
    including a final stop/EOS token), ``text`` (``token_ids`` decoded, special tokens skipped, when the engine has
    a tokenizer; else None) and ``finish_reason`` ("stop": a stop or EOS token; "length": max_tokens or
    max_model_len; None while unfinished).

    ``text`` is decoded when first read, not when the output is made: ``Engine.step()`` hands back an output for
    every request that advanced, and decoding each one's whole text at every step costs far more than the step
    (256 requests of 300 tokens: about 50 ms of host time a step, against a few ms of GPU time)."""

    __slots__ = ("request_id", "prompt_token_ids", "token_ids", "finish_reason", "_text", "_detokenize")

    def __init__(self, request_id: str, prompt_token_ids: list[int], token_ids: list[int], text: str | None = None,
                 finish_reason: str | None = None, *, detokenize: Callable[[list[int]], str] | None = None):
        if text is not None and detokenize is not None:
            raise ValueError("give the text or a detokenize function, not both")
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.token_ids = token_ids
        self.finish_reason = finish_reason
        self._text = text
        self._detokenize = detokenize

    @property
    def text(self) -> str | None:
        if self._detokenize is not None:
            self._text, self._detokenize = self._detokenize(self.token_ids), None
        return self._text

    @text.setter
    def text(self, value: str | None) -> None:
        self._text, self._detokenize = value, None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _fields(self) -> tuple:
        return self.request_id, self.prompt_token_ids, self.token_ids, self.text, self.finish_reason

    def __eq__(self, other) -> bool:
        return isinstance(other, RequestOutput) and self._fields() == other._fields()

    __hash__ = None  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt_token_ids={self.prompt_token_ids!r}, "
                f"token_ids={self.token_ids!r}, text={self.text!r}, finish_reason={self.finish_reason!r})")
