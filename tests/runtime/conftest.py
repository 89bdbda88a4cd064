"""Tiny models, HF references and comparison helpers shared by the runtime's engine tests."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..tolerances import LOGITS

# Mixed prompt lengths (1 token .. several blocks) and max_tokens (1 .. longer than most prompts).
PROMPT_LENS = [1, 3, 7, 12, 17, 25, 33, 40]
MAX_TOKENS = [1, 5, 16, 9, 24, 3, 12, 20]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides):
    """A random-weight Llama small enough for CPU tests: GQA (4 query heads over 2 KV heads), head_dim 16."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).to(device=device, dtype=dtype).eval()


GPU_DTYPE = torch.bfloat16


def gpu_tiny_llama():
    """The GPU engine tests' bf16 model: head_dim 64 and 4 layers, the shapes the Triton kernels specialise on,
    still seconds to compile."""
    return tiny_llama(dtype=GPU_DTYPE, device="cuda", vocab_size=1024, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def gpu_margin(best_logit: float) -> float:
    """How far apart two bf16 logits may be and still count as a tie (for ``assert_same_or_tie``)."""
    atol, rtol = LOGITS[GPU_DTYPE]
    return atol + rtol * abs(best_logit)


def make_prompts(vocab_size: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Token ids from 3 up: skip the special ids (0 pad/unk, 1 BOS, 2 EOS) inside prompts.
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
    """HF ``generate`` greedy continuation of one prompt (batch 1, no padding): the tokens after the prompt,
    EOS included when the model stops on it (unless ``ignore_eos``)."""
    config = copy.deepcopy(model.generation_config)
    if ignore_eos:
        config.eos_token_id = None
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, generation_config=config, attention_mask=torch.ones_like(ids),
                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def assert_same_or_tie(model, prompt: list[int], expected: list[int], actual: list[int], margin) -> None:
    """``actual`` must equal HF's ``expected`` up to the first position where they differ; there, cinfer's token
    must be within ``margin(top1_logit)`` of HF's best logit (a near-tie that low-precision rounding may flip).
    After a flip the continuations legitimately differ, so nothing later is compared."""
    n = min(len(expected), len(actual))
    first = next((i for i in range(n) if expected[i] != actual[i]), None)
    if first is None:
        assert len(expected) == len(actual), f"lengths differ: HF {len(expected)}, cinfer {len(actual)}"
        return
    ids = torch.tensor([prompt + expected[:first]], device=model.device)
    logits = model(ids).logits[0, -1].float()
    best = logits.max().item()
    gap = best - logits[actual[first]].item()
    assert gap <= margin(best), (
        f"diverged from HF at generated token {first} ({actual[first]} vs HF's {expected[first]}), whose logits "
        f"HF puts {gap:.4g} apart: not a tie")


# The CPU engine tests' shared float32 model, prompts and HF references (one per test module).
@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompts(model):
    return make_prompts(model.config.vocab_size)


@pytest.fixture(scope="module")
def reference(model, prompts):
    """HF greedy continuations, computed before any engine touches the model."""
    return [hf_greedy(model, p, m) for p, m in zip(prompts, MAX_TOKENS)]


# The GPU tests' shared bf16 model and prompts (one model per session: building it is the slow part).
@pytest.fixture(scope="session")
def gpu_model():
    return gpu_tiny_llama()


@pytest.fixture(scope="session")
def gpu_prompts(gpu_model):
    return make_prompts(gpu_model.config.vocab_size, lens=PROMPT_LENS * 2, seed=3)
