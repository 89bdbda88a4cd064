"""Model shapes the benchmarks use (random weights: no hub access), or a local checkpoint folder."""
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

CONFIGS = {
    # Llama-3-8B / Llama-3.2-1B shapes; rope_scaling as in the released configs.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048),
}


def projection_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each weight [N, K] that a CONFIGS model's layers stream, as cinfer runs them: fused q/k/v, o_proj,
    fused gate/up, down_proj, and lm_head."""
    c = CONFIGS[name]
    hidden, inter, heads, kv_heads = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                                      c["num_key_value_heads"])
    head_dim = hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate_up": (2 * inter, hidden), "down": (hidden, inter), "lm_head": (c["vocab_size"], hidden)}


# The projections of Llama-3-8B and Llama-3.2-1B by short name ("8b.qkv", ..., "1b.lm_head"): the GEMM benchmarks'
# shapes (tune_linear.py, bench_prefill_linear.py).
PROJECTION_SHAPES = {f"{tag}.{proj}": shape for tag, name in (("8b", "llama3-8b"), ("1b", "llama3-1b"))
                     for proj, shape in projection_shapes(name).items()}


def load_model(name: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A config name from CONFIGS (random weights, seeded) or a local HF checkpoint folder."""
    if os.path.isdir(name):
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIGS[name])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    # HF's init leaves std 0.02 weights: fine for timing (random, never zeros); eos never stops anything
    # because every benchmark passes ignore_eos / min_new_tokens.
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step must read: every parameter once (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
