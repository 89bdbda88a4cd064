"""Prefix caching: the block manager's cache (matching, sharing, reference counts, eviction) and the engine reusing
cached prompt prefixes while still generating exactly what HF ``generate`` does."""
import random

import cinfer_runtime
from cinfer_runtime import SamplingParams
from cinfer_runtime.block_manager import BlockManager

from .conftest import hf_greedy

BS = 4


def _computed(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[int]:
    """Run ``seq_id`` over all of ``tokens`` as the scheduler would, from whatever prefix the cache gives it."""
    blocks = bm.match_prefix(tokens)
    assert bm.can_take_prefix(seq_id, blocks, len(tokens))
    bm.take_prefix(seq_id, blocks)
    table = bm.grow(seq_id, len(tokens))
    bm.cache_computed(seq_id, tokens, len(tokens))
    return table


def test_match_needs_full_blocks_and_leaves_the_last_token():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = list(range(100, 111))                  # 11 tokens: blocks [0:4] and [4:8] full, [8:11] partial
    table = _computed(bm, 0, a)
    assert bm.match_prefix(a) == table[:2]     # the partial block is never keyed
    assert bm.match_prefix(a[:8]) == table[:1]  # 8 tokens: one block, so that the last token is computed
    assert bm.match_prefix(a[:9]) == table[:2]
    assert bm.match_prefix([7] + a[1:]) == []  # a different first token changes every key after it
    assert bm.match_prefix(a[:4] + [0] * 7) == table[:1]


def test_shared_blocks_are_reference_counted_and_evicted_last():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    prompt = list(range(9))                    # 2 full blocks + 1
    first = _computed(bm, 0, prompt)
    second = _computed(bm, 1, prompt)
    assert second[:2] == first[:2] and second[2] != first[2]
    assert [bm.refcount(b) for b in first[:2]] == [2, 2] and bm.num_cached_tokens == 8
    bm.free(0)
    assert [bm.refcount(b) for b in first[:2]] == [1, 1] and first[2] in bm.free_block_ids()
    bm.free(1)
    assert bm.num_free_blocks == 6 and sorted(bm.free_block_ids()) == list(range(6))
    # Plain free blocks go first; the cached ones survive until nothing else is left.
    other = bm.grow(2, 4 * BS)                 # 4 blocks: the 4 uncached ones
    assert not set(other) & set(first[:2]) and bm.match_prefix(prompt) == first[:2]
    bm.grow(2, 5 * BS)                         # a 5th block: evicts the least recently freed cached block
    assert bm.match_prefix(prompt) in ([], first[:1])
    bm.free(2)
    assert sorted(bm.free_block_ids()) == list(range(6))


def test_taking_evictable_blocks_counts_against_free_space():
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    prompt = list(range(2 * BS + 1))
    table = _computed(bm, 0, prompt)
    bm.free(0)
    blocks = bm.match_prefix(prompt)
    assert blocks == table[:2] and bm.num_free_blocks == 3
    assert bm.can_take_prefix(1, blocks, len(prompt))          # 2 cached + 1 new of 3
    assert not bm.can_take_prefix(1, blocks, len(prompt) + BS)  # 2 cached + 2 new: only 1 block is really free


def test_random_workload_keeps_accounting():
    """Random prompts drawn from a few shared prefixes, freed in random order: blocks are never lost, a table
    never holds a block twice, reference counts match the tables, and every matched block holds the right
    tokens (checked against a shadow copy of what each block was computed with)."""
    rng = random.Random(0)
    bm = BlockManager(24, BS, enable_prefix_caching=True)
    contents: dict[int, list[int]] = {}  # block -> tokens it holds, as computed
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: dict[int, list[int]] = {}
    for seq_id in range(300):
        if live and (rng.random() < 0.5 or bm.num_free_blocks < 6):
            bm.free(live.pop(rng.choice(list(live))))
            continue
        tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 8))]
        blocks = bm.match_prefix(tokens)
        if not bm.can_take_prefix(seq_id, blocks, len(tokens)):
            continue
        for i, block in enumerate(blocks):
            assert contents[block] == tokens[i * BS:(i + 1) * BS]
        bm.take_prefix(seq_id, blocks)
        table = bm.grow(seq_id, len(tokens))
        for i, block in enumerate(table[len(blocks):], start=len(blocks)):
            contents[block] = tokens[i * BS:(i + 1) * BS]
        bm.cache_computed(seq_id, tokens, len(tokens))
        live[seq_id] = seq_id
        owned = [b for t in bm.block_tables.values() for b in t]
        assert set(owned).isdisjoint(bm.free_block_ids())
        assert set(owned) | set(bm.free_block_ids()) == set(range(24))
        assert all(bm.refcount(b) == owned.count(b) for b in set(owned))
    assert bm.num_cached_tokens > 0


def test_engine_reuses_prefixes_and_matches_hf(model):
    """Requests sharing a long system prompt, one after the other and side by side, plus a repeat of an earlier
    prompt: later ones start on cached blocks, and every output equals HF greedy and the uncached engine's."""
    rng = random.Random(1)
    vocab = model.config.vocab_size
    system = [rng.randrange(3, vocab) for _ in range(41)]
    prompts = [system + [rng.randrange(3, vocab) for _ in range(n)] for n in (3, 9, 1, 14)]
    prompts.append(list(prompts[1]))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reference = [hf_greedy(model, p, 6, ignore_eos=True) for p in prompts]
    kwargs = dict(block_size=8, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=16, inner_backend="eager")
    engine = cinfer_runtime.compile(model, **kwargs)
    bm = engine.scheduler.block_manager
    first = engine.generate(prompts[:1], params, use_tqdm=False)   # fills the cache with the system prompt
    assert bm.num_cached_tokens == 0
    rest = engine.generate(prompts[1:], params, use_tqdm=False)
    assert [o.token_ids for o in first + rest] == reference
    # Each later request matched at least the system prompt's 5 full blocks; the repeat matched more.
    assert bm.num_cached_tokens >= 4 * 40
    uncached = cinfer_runtime.compile(model, enable_prefix_caching=False, **kwargs)
    assert [o.token_ids for o in uncached.generate(prompts, params, use_tqdm=False)] == reference
    assert uncached.scheduler.block_manager.num_cached_tokens == 0
