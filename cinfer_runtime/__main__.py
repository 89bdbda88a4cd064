"""Generation demo: ``python -m cinfer_runtime`` (or ``cinfer``).

Without ``--model`` it builds a tiny Llama with random weights (so it runs anywhere, in seconds, and its outputs
are random tokens); with ``--model PATH`` it loads a local Hugging Face checkpoint folder and, if the folder has a
tokenizer, generates from text prompts.
"""
import argparse
import logging
import random
import time

import torch

DEMO_PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
    "The three laws of thermodynamics are",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cinfer_runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="PATH", help="local Hugging Face checkpoint folder (default: a built-in tiny "
                   "Llama with random weights)")
    p.add_argument("--num-prompts", type=int, default=32, help="requests to generate (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per request (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="(default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="largest decode batch (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens (default: %(default)s)")
    p.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (default: sized from device memory)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before reading the previous step's tokens (default: on for a GPU)")
    p.add_argument("--inner-backend", default="inductor", choices=["inductor", "eager"],
                   help="compiler for the rewritten graph (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weights of the built-in model, prompts, sampling")
    return p.parse_args(argv)


def tiny_llama(dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import cinfer_runtime
    from cinfer_runtime import SamplingParams

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    rng = random.Random(args.seed)
    tokenizer = None
    if args.model is None:
        model = tiny_llama(dtype, args.device, args.seed)
        print(f"model: built-in tiny Llama with random weights ({sum(p.numel() for p in model.parameters()):,} "
              f"parameters); outputs are random tokens")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError):
            print(f"no tokenizer in {args.model}: prompts are random token ids")
        print(f"model: {args.model}")
    if tokenizer is not None:
        prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(args.num_prompts)]
    else:
        vocab = model.config.get_text_config().vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(4, 48))] for _ in range(args.num_prompts)]

    start = time.perf_counter()
    engine = cinfer_runtime.compile(model, tokenizer=tokenizer, block_size=args.block_size,
                                    num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
                                    enforce_eager=args.enforce_eager, inner_backend=args.inner_backend,
                                    seed=args.seed, async_scheduling=args.async_scheduling)
    print(f"compiled in {time.perf_counter() - start:.1f} s on {args.device} ({str(dtype).removeprefix('torch.')})")

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            ignore_eos=tokenizer is None)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    for out in outputs[:4]:
        shown = repr(out.text) if out.text is not None else out.token_ids[:16]
        print(f"[{out.request_id}] {len(out.prompt_token_ids)} prompt tokens -> {len(out.token_ids)} tokens "
              f"({out.finish_reason}): {shown}")
    generated = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} requests, {generated} tokens in {seconds:.2f} s: {generated / seconds:.0f} tokens/s "
          f"({engine.scheduler.num_preemptions} preemptions)")


if __name__ == "__main__":
    main()
