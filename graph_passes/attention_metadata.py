"""What the runtime hands the rewritten graph each step, besides the tokens.

All tensors live on the model's device. The runtime fills them into static-address buffers and passes
views of the live prefix, so a CUDA graph captured over one set of views replays over refilled buffers.
"""
from dataclasses import dataclass

from torch import Tensor


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor      # int64 [num_tokens]: cache slot of each token of the step, -1 = padding (skip)
    block_tables: Tensor      # int32 [batch, max_blocks_per_seq]
    seq_lens: Tensor          # int32 [batch]: context length of each sequence including this step's tokens
    query_start_loc: Tensor   # int32 [batch + 1]: prefix sums of the new-token counts
    logits_indices: Tensor    # int64 [batch]: row (in the step's tokens) of each sequence's last new token
