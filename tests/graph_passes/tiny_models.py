"""Tiny random HF models of every supported variant, and a paged-cache step driver checked against HF eager.

Weights are re-drawn at a scale where logits are O(1) and norm weights are far from 1, so a wrong norm, RoPE,
head grouping or cache slot shows up in the logits.
"""
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from graph_passes import AttentionMetadata

VOCAB = 96
BLOCK_SIZE = 8
NUM_BLOCKS = 24

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               max_position_embeddings=128, rms_norm_eps=1e-5)

# name -> (model class, config class, config kwargs)
VARIANTS = {
    "llama2_mha": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama3_gqa_rope_scaling": (LlamaForCausalLM, LlamaConfig,
                                dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama_mqa": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama_head_dim": (LlamaForCausalLM, LlamaConfig,
                       dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "llama_tied_bias": (LlamaForCausalLM, LlamaConfig,
                        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             attention_bias=True, mlp_bias=True)),
    "llama_eager_gqa": (LlamaForCausalLM, LlamaConfig,
                        dict(num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")),
    "mistral": (MistralForCausalLM, MistralConfig,
                dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
}


def make_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> torch.nn.Module:
    model_cls, config_cls, kwargs = VARIANTS[name]
    kwargs = {"attn_implementation": "sdpa", **_COMMON, **kwargs, **overrides}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.6 / p.shape[-1] ** 0.5 if "embed" not in pname else 1.0)
    return model.to(dtype)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def make_caches(model: torch.nn.Module, num_blocks: int = NUM_BLOCKS, block_size: int = BLOCK_SIZE):
    """Per-layer K and V caches poisoned with NaN: any read of a slot nobody wrote shows up in the logits."""
    c = model.config
    shape = (num_blocks, block_size, c.num_key_value_heads, head_dim(c))
    dtype = next(model.parameters()).dtype
    k = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(c.num_hidden_layers)]
    v = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(c.num_hidden_layers)]
    return k, v


@dataclass
class Sequence:
    tokens: torch.Tensor      # int64 [prompt + generated]
    blocks: list[int]         # the sequence's block table


class PagedDriver:
    """Builds each step's flattened inputs and metadata for sequences that live at scattered blocks."""

    def __init__(self, num_blocks: int = NUM_BLOCKS, block_size: int = BLOCK_SIZE, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.block_size = block_size
        self.sequences: list[Sequence] = []
        self.gen = g

    def add(self, length: int) -> int:
        tokens = torch.randint(0, VOCAB, (length,), generator=self.gen)
        blocks_needed = -(-length // self.block_size)
        self.sequences.append(Sequence(tokens, [self.free.pop() for _ in range(blocks_needed)]))
        return len(self.sequences) - 1

    def step_inputs(self, chunks: list[tuple[int, int, int]]):
        """chunks: (sequence, start, end) -- this step computes tokens [start, end) of the sequence, whose earlier
        tokens are already cached. Returns input_ids [1, N], positions [1, N] and the metadata."""
        ids, pos, slots, qsl, seq_lens, tables = [], [], [], [0], [], []
        width = max(len(self.sequences[s].blocks) for s, _, _ in chunks)
        for s, start, end in chunks:
            seq = self.sequences[s]
            ids += seq.tokens[start:end].tolist()
            pos += list(range(start, end))
            slots += [seq.blocks[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, end)]
            qsl.append(qsl[-1] + end - start)
            seq_lens.append(end)
            # entries past a sequence's last block hold garbage the kernels must never read
            tables.append(seq.blocks + [10_000] * (width - len(seq.blocks)))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            logits_indices=torch.tensor(qsl[1:], dtype=torch.int64) - 1,
        )
        return torch.tensor([ids]), torch.tensor([pos]), meta

    def reference_logits(self, model, chunks) -> torch.Tensor:
        """HF eager over each sequence's whole prefix up to ``end``: logits of its last token, [batch, vocab]."""
        with torch.no_grad():
            return torch.stack([model(input_ids=self.sequences[s].tokens[None, :end], use_cache=False).logits[0, -1]
                                for s, _, end in chunks])


def run_scenario(model, paged_model, table: dict, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Drive ``paged_model`` through prefill, chunked prefill, a mixed step, a decode-only step and a one-token
    one-sequence step; compare every step's logits with HF eager over the whole prefix. Returns the steps run."""
    from tests.tolerances import assert_close

    driver = PagedDriver(seed=seed)
    for length in (13, 21, 7):
        driver.add(length)
    steps = [
        [(0, 0, 12), (1, 0, 9)],                   # prefill of seq 0 (12 of its 13) + first chunk of seq 1
        [(0, 12, 13), (1, 9, 20), (2, 0, 5)],      # seq 0 finishes its prompt, seq 1 chunk 2, seq 2 prefill
        [(1, 20, 21), (2, 5, 6)],                  # decode-only batch of two
        [(2, 6, 7)],                               # one sequence, one token: the size-1 dims are padded
    ]
    for i, chunks in enumerate(steps):
        input_ids, positions, meta = driver.step_inputs(chunks)
        logits = paged_model(input_ids, positions, meta)
        expected = driver.reference_logits(model, chunks)
        assert logits.shape == expected.shape, f"step {i}: {tuple(logits.shape)} != {tuple(expected.shape)}"
        assert_close(logits, expected, table, dtype, msg=f"step {i} {chunks}")
    return len(steps)
