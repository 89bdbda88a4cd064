"""What the engine hands back for a request: its tokens so far and, once finished, why it stopped."""
from dataclasses import dataclass


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]              # generated tokens only (prompt excluded), including a final stop/EOS token
    text: str | None                  # token_ids decoded (special tokens skipped) when the engine has a tokenizer
    finish_reason: str | None         # "stop" (a stop or EOS token), "length" (max_tokens or max_model_len), None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
