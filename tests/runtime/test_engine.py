"""The engine end to end on CPU in float32: greedy outputs equal HF ``generate`` (chunked and whole prefill, heavy
preemption, Inductor and eager inner backends), seeded sampling, streaming, the incremental API, stop conditions,
bad input, and the demo."""
import pytest
import torch

import cinfer_runtime
from cinfer_runtime import RequestOutput, SamplingParams
from graph_passes import GraphRewriteError

from .conftest import MAX_TOKENS, PROMPT_LENS, hf_greedy, make_prompts, tiny_llama

BLOCK_SIZE = 8


@pytest.fixture(scope="module")
def engine(model, reference):
    # Budget 32 < the longest prompt (40): prompts are prefilled in chunks, next to other requests' decodes.
    return cinfer_runtime.compile(model, block_size=BLOCK_SIZE, num_kv_blocks=64, max_num_seqs=8,
                                  max_num_batched_tokens=32, inner_backend="eager")


@pytest.fixture(scope="module")
def small_cache_engine(model, reference):
    # 8 blocks x 8 = 64 cache slots for ~400 tokens of work: the biggest request (40 + 20) just fits on its own.
    return cinfer_runtime.compile(model, block_size=BLOCK_SIZE, num_kv_blocks=8, max_num_seqs=4,
                                  max_num_batched_tokens=16, inner_backend="eager")


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def generate_greedy(engine, prompts) -> list[RequestOutput]:
    return engine.generate(prompts, [greedy(m) for m in MAX_TOKENS], use_tqdm=False)


def test_greedy_matches_hf_chunked_prefill(engine, prompts, reference):
    outs = generate_greedy(engine, prompts)
    assert [o.token_ids for o in outs] == reference
    assert [o.prompt_token_ids for o in outs] == prompts
    for o, ref, m in zip(outs, reference, MAX_TOKENS):
        assert o.finish_reason == ("length" if len(ref) == m and ref[-1] != 2 else "stop")
        assert o.text is None


def test_greedy_matches_hf_whole_prefill_inductor(model, prompts, reference):
    # The default inner backend (Inductor), with chunked prefill off: every prompt is prefilled in one step.
    engine = cinfer_runtime.compile(model, block_size=BLOCK_SIZE, num_kv_blocks=64, max_num_seqs=8,
                                    enable_chunked_prefill=False)
    assert engine.config.max_num_batched_tokens >= max(PROMPT_LENS)
    assert [o.token_ids for o in generate_greedy(engine, prompts)] == reference


def test_greedy_matches_hf_under_heavy_preemption(small_cache_engine, prompts, reference):
    before = small_cache_engine.scheduler.num_preemptions
    outs = generate_greedy(small_cache_engine, prompts)
    assert small_cache_engine.scheduler.num_preemptions - before >= 3, "the small cache was meant to preempt"
    assert [o.token_ids for o in outs] == reference
    bm = small_cache_engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("inner_backend", ["eager", "inductor"])
def test_deep_model_with_replicated_layers_matches_hf(prompts, inner_backend):
    """Five layers: Dynamo traces two, layers 2-4 run layer 1's compiled piece (graph_passes.layer_replication),
    each with its own weights and KV cache, under chunked prefill."""
    deep = tiny_llama(seed=1, num_hidden_layers=5)
    expected = [hf_greedy(deep, p, m) for p, m in zip(prompts, MAX_TOKENS)]
    engine = cinfer_runtime.compile(deep, block_size=BLOCK_SIZE, num_kv_blocks=64, max_num_seqs=8,
                                    max_num_batched_tokens=32, inner_backend=inner_backend)
    assert engine.paged_model.traced_layers == 2
    assert (engine.paged_model.split_report.pieces, engine.paged_model.split_report.compiled) == (7, 4)
    assert [o.token_ids for o in generate_greedy(engine, prompts)] == expected


def test_one_sequence_at_a_time_matches_hf(model, prompts, reference):
    # max_num_seqs=1 (the batch-1 benchmark's setting): requests run strictly one after another.
    engine = cinfer_runtime.compile(model, block_size=BLOCK_SIZE, num_kv_blocks=16, max_num_seqs=1,
                                    inner_backend="eager")
    outs = engine.generate(prompts[:3], [greedy(m) for m in MAX_TOKENS[:3]], use_tqdm=False)
    assert [o.token_ids for o in outs] == reference[:3]


def test_padding_rows_leave_real_rows_unchanged(engine, prompts):
    """What CUDA-graph decode relies on, checked on the real ops: padding a decode step to a larger batch
    (slot -1 tokens, sequences with no new tokens) changes neither the real rows' logits nor the cache."""
    for p in prompts[:3]:
        engine.add_request(p, greedy(4))
    engine.step()  # all three prefilled in one step (budget 32 >= 1 + 3 + 7)
    out = engine.scheduler.schedule()
    assert out.is_decode and len(out.seqs) == 3
    runner = engine.runner
    num_tokens, batch = runner._prepare(out)
    exact = engine.paged_model(*runner.dev.model_inputs(num_tokens, batch)).clone()
    caches = [c.clone() for c in engine.k_caches + engine.v_caches]
    runner._pad(num_tokens, batch, 8, 8)
    padded = engine.paged_model(*runner.dev.model_inputs(8, 8))
    assert padded.shape[0] == 8
    torch.testing.assert_close(padded[:batch], exact, rtol=0, atol=1e-6)
    for before, after in zip(caches, engine.k_caches + engine.v_caches):
        # The real tokens' K/V are rewritten (equal up to the GEMM's batch-dependent rounding); every other slot,
        # NaN or not, is untouched.
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6, equal_nan=True)
    engine.scheduler.update(out, runner.execute(out))
    while engine.has_unfinished_requests():
        engine.step()


def test_seeded_sampling_reproducible_and_batch_independent(engine, small_cache_engine, prompts):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    target = prompts[4]
    alone = engine.generate([target], params, use_tqdm=False)[0].token_ids
    again = engine.generate([target], params, use_tqdm=False)[0].token_ids
    others = [SamplingParams(max_tokens=m, temperature=1.0, seed=i) for i, m in enumerate(MAX_TOKENS)]
    batch = engine.generate(prompts[:3] + [target] + prompts[3:], others[:3] + [params] + others[3:],
                            use_tqdm=False)
    preempted = small_cache_engine.generate(prompts[:3] + [target], others[:3] + [params], use_tqdm=False)
    assert len(alone) == 12
    assert again == alone
    assert batch[3].token_ids == alone, "a seeded request's tokens must not depend on its batch"
    assert preempted[3].token_ids == alone, "nor on preemption"
    other_seed = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=99, ignore_eos=True)
    assert engine.generate([target], other_seed, use_tqdm=False)[0].token_ids != alone


def test_stream_yields_the_same_tokens_as_generate(engine, prompts, reference):
    outs = list(engine.stream(prompts[4], greedy(MAX_TOKENS[4])))
    assert [o.token_ids for o in outs] == [reference[4][:i + 1] for i in range(len(reference[4]))]
    assert all(o.finish_reason is None for o in outs[:-1]) and outs[-1].finished
    # A stream closed early aborts its request and frees its blocks.
    stream = engine.stream(prompts[6], greedy(10))
    next(stream)
    stream.close()
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.block_manager.num_free_blocks == engine.config.num_kv_blocks


def test_incremental_api(engine, prompts, reference):
    ids = [engine.add_request(p, greedy(m)) for p, m in zip(prompts, MAX_TOKENS)]
    assert len(set(ids)) == len(ids) and engine.has_unfinished_requests()
    final = {}
    last_len = {i: 0 for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert len(out.token_ids) == last_len[out.request_id] + 1, "step returns requests that advanced"
            last_len[out.request_id] = len(out.token_ids)
            if out.finished:
                final[out.request_id] = out.token_ids
    assert [final[i] for i in ids] == reference


def test_generate_keeps_outputs_of_other_requests(engine, prompts, reference):
    pending = engine.add_request(prompts[7], greedy(MAX_TOKENS[7]))
    assert engine.generate([prompts[1]], greedy(MAX_TOKENS[1]), use_tqdm=False)[0].token_ids == reference[1]
    collected = []
    while engine.has_unfinished_requests() or not collected:
        collected += [o for o in engine.step() if o.request_id == pending]
    assert collected[-1].finished and collected[-1].token_ids == reference[7]


def test_stop_conditions(engine, model, prompts, reference):
    ref = reference[4]  # 24 greedy tokens
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    stopped = engine.generate([prompts[4]], greedy(24, stop_token_ids=[ref[k]]), use_tqdm=False)[0]
    assert stopped.token_ids == ref[:k + 1] and stopped.finish_reason == "stop"
    eos = engine.eos_token_ids
    try:  # the model's EOS stops generation unless ignore_eos
        engine.eos_token_ids = frozenset({ref[k]})
        assert engine.generate([prompts[4]], greedy(24), use_tqdm=False)[0].token_ids == ref[:k + 1]
        full = engine.generate([prompts[4]], greedy(24, ignore_eos=True), use_tqdm=False)[0]
        assert full.token_ids == ref and full.finish_reason == "length"
    finally:
        engine.eos_token_ids = eos
    # max_model_len (128 here) ends a request whatever its max_tokens.
    long_prompt = make_prompts(model.config.vocab_size, lens=[122], seed=1)[0]
    out = engine.generate([long_prompt], greedy(20, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and out.token_ids == hf_greedy(model, long_prompt, 6, ignore_eos=True)


def test_bad_input_raises_before_work_and_loses_nothing(engine, small_cache_engine, prompts, reference):
    pending = engine.add_request(prompts[5], greedy(MAX_TOKENS[5]))
    vocab = engine.vocab_size
    bad_calls = [
        (ValueError, "empty", lambda: engine.add_request([], greedy(4))),
        (ValueError, "outside the vocabulary", lambda: engine.add_request([3, vocab], greedy(4))),
        (ValueError, "outside the vocabulary", lambda: engine.add_request([-1, 3], greedy(4))),
        (ValueError, "max_model_len", lambda: engine.add_request([3] * 129, greedy(4))),
        (TypeError, "tokenizer", lambda: engine.add_request("hello", greedy(4))),
        (TypeError, "SamplingParams", lambda: engine.add_request([3, 4], {"max_tokens": 4})),
        (TypeError, "ints", lambda: engine.add_request([3, 4.0], greedy(4))),
        (ValueError, "2 SamplingParams for 3 prompts",
         lambda: engine.generate(prompts[:3], [greedy(2), greedy(2)], use_tqdm=False)),
        (ValueError, "empty", lambda: engine.generate([prompts[0], []], greedy(2), use_tqdm=False)),
        (ValueError, "already in use", lambda: engine.add_request([3, 4], greedy(2), request_id=pending)),
        (ValueError, "max_tokens", lambda: SamplingParams(max_tokens=0)),
        (ValueError, "cache holds 64",
         lambda: small_cache_engine.add_request(prompts[7], greedy(30))),
    ]
    for error, words, call in bad_calls:
        with pytest.raises(error, match=words):
            call()
        assert len(engine.scheduler.waiting) + len(engine.scheduler.running) == 1, words
    assert not small_cache_engine.has_unfinished_requests()
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step()})
    assert set(final) == {pending} and final[pending].token_ids == reference[5]


def test_model_the_passes_cannot_rewrite_fails_in_compile():
    class NoAttention(torch.nn.Module):
        """An attention layer that attends to nothing: no attention pattern for the passes to find."""

        def __init__(self, attn):
            super().__init__()
            self.v_proj, self.o_proj = attn.v_proj, attn.o_proj

        def forward(self, hidden_states, *args, **kwargs):
            return self.o_proj(self.v_proj(hidden_states).repeat(1, 1, 2)), None

    model = tiny_llama(seed=1)
    model.model.layers[0].self_attn = NoAttention(model.model.layers[0].self_attn)
    with pytest.raises(GraphRewriteError, match="attention"):
        cinfer_runtime.compile(model, block_size=BLOCK_SIZE, num_kv_blocks=8, inner_backend="eager")


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over "w3" ... "w{vocab_size - 1}" (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_tokenizer_strings_in_and_out(model):
    tokenizer = word_tokenizer(model.config.vocab_size)
    engine = cinfer_runtime.compile(model, tokenizer=tokenizer, block_size=BLOCK_SIZE, num_kv_blocks=16,
                                    max_num_seqs=4, inner_backend="eager")
    text_prompts = ["w5 w17 w99 w3", "w200"]
    outs = engine.generate(text_prompts, greedy(6), use_tqdm=False)
    for text, out in zip(text_prompts, outs):
        assert out.prompt_token_ids == tokenizer.encode(text)
        assert out.token_ids == hf_greedy(model, out.prompt_token_ids, 6)
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True) and out.text
    assert engine.generate("w5 w17 w99 w3", greedy(6), use_tqdm=False)[0].token_ids == outs[0].token_ids


def test_step_outputs_decode_their_text_when_read(model, prompts, reference, monkeypatch):
    # step() hands back an output for every request that advanced. Its text is decoded when first read (decoding
    # every request's whole text at every step costs far more than the step), then kept; it equals the decode of
    # the tokens the output holds, not of the request's later tokens.
    tokenizer = word_tokenizer(model.config.vocab_size)
    decoded = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(list(ids)) or decode(ids, **kw))
    engine = cinfer_runtime.compile(model, tokenizer=tokenizer, block_size=BLOCK_SIZE, num_kv_blocks=16,
                                    max_num_seqs=4, inner_backend="eager")
    ids = [engine.add_request(p, greedy(m)) for p, m in zip(prompts[1:4], MAX_TOKENS[1:4])]
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert decoded == [] and len(outputs) == sum(MAX_TOKENS[1:4])
    for out in outputs[::-1]:  # the latest first: the earlier ones must still hold their own shorter texts
        index = ids.index(out.request_id) + 1
        assert out.token_ids == reference[index][:len(out.token_ids)]
        assert out.prompt_token_ids == prompts[index]
        assert out.text == decode(out.token_ids, skip_special_tokens=True)
        assert out.text == out.text and decoded[-1] == out.token_ids  # read twice, decoded once
    assert len(decoded) == len(outputs)
    first = [o for o in outputs if o.request_id == ids[0]]
    assert first[0].prompt_token_ids is first[-1].prompt_token_ids  # one copy per request, not per output
    assert first[-1] == RequestOutput(ids[0], list(prompts[1]), reference[1], first[-1].text, "length")
    assert "text=" in repr(first[-1]) and first[-1].finished and not first[0].finished
    first[0].text = "edited"  # assignable, as the dataclass it replaced
    assert first[0].text == "edited" and first[0] != first[-1]


def test_demo_runs_and_documents_its_options(capsys):
    from cinfer_runtime.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--model", "--max-tokens", "--num-prompts", "--enforce-eager", "--temperature"):
        assert option in help_text
    main(["--num-prompts", "6", "--max-tokens", "8", "--inner-backend", "eager"])
    printed = capsys.readouterr().out
    assert "6 requests, 48 tokens" in printed and "tokens/s" in printed


def test_sliding_window_model_is_capped_to_its_window():
    # The paged op is full causal: for a sliding-window model (Mistral v0.1-style) that equals HF's attention only
    # while a context fits the window, so the engine caps max_model_len there and rejects longer prompts.
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=16)).eval()
    engine = cinfer_runtime.compile(model, block_size=BLOCK_SIZE, num_kv_blocks=16, max_num_seqs=2,
                                    inner_backend="eager")
    assert engine.config.max_model_len == 16
    prompt = make_prompts(256, lens=[6])[0]
    out = engine.generate([prompt], greedy(10, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(model, prompt, 10, ignore_eos=True)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([make_prompts(256, lens=[20])[0]], greedy(2), use_tqdm=False)


def test_unread_outputs_do_not_keep_the_engine_alive(model, prompts):
    # An output decodes its text when read, with the tokenizer's own decode: one kept after the engine is dropped
    # must not keep the engine (and its KV caches) alive, and still reads its text.
    import gc
    import weakref

    tokenizer = word_tokenizer(model.config.vocab_size)
    engine = cinfer_runtime.compile(model, tokenizer=tokenizer, block_size=BLOCK_SIZE, num_kv_blocks=16,
                                    max_num_seqs=4, inner_backend="eager")
    engine.add_request(prompts[2], greedy(3))
    kept = []
    while engine.has_unfinished_requests():
        kept += engine.step()
    alive = weakref.ref(engine)
    del engine
    gc.collect()
    assert alive() is None
    assert kept[-1].text == tokenizer.decode(kept[-1].token_ids, skip_special_tokens=True)
