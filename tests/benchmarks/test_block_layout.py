"""benchmarks.block_layout's locality measure and its serving simulation (the real scheduler and block manager)."""
import random

from benchmarks.block_layout import random_like, regions_per_block, serving_steps


def test_regions_per_block():
    assert regions_per_block([list(range(8))], 64) == 1 / 8  # one run of 8 blocks: one region
    assert regions_per_block([[0, 64, 128, 192]], 64) == 1.0  # every block in a region of its own
    # 2 windows of 8 positions: the first touches regions 0 and 1 over 16 blocks, the second 0 and 2 over 8
    tables = [list(range(0, 12)), list(range(64, 72)) + [130, 131, 132, 133]]
    assert regions_per_block(tables, 64) == (2 + 2) / 24
    assert regions_per_block([], 64) != regions_per_block([], 64)  # nan: nothing read


def test_random_like_keeps_lengths_and_draws_distinct_blocks():
    tables = [[1, 2, 3], [4], [5, 6]]
    drawn = random_like(tables, 1000, random.Random(0))
    assert list(map(len, drawn)) == [3, 1, 2]
    flat = [b for t in drawn for b in t]
    assert len(set(flat)) == 6 and all(0 <= b < 1000 for b in flat)


def test_serving_steps_runs_the_workload_to_the_end():
    steps, num_blocks, decode_steps = serving_steps(24, 8, (20, 60), (5, 30), every=3)
    assert decode_steps > 0 and len(steps) == -(-decode_steps // 3)
    for tables in steps:
        assert 1 <= len(tables) <= 8
        flat = [b for t in tables for b in t]
        assert len(set(flat)) == len(flat) and all(0 <= b < num_blocks for b in flat)  # no block held twice


def test_serving_steps_contexts_fit_their_tables():
    steps, _, _ = serving_steps(24, 8, (20, 60), (5, 30), every=2, with_contexts=True)
    for tables, contexts in steps:
        assert len(tables) == len(contexts)
        for table, ctx in zip(tables, contexts):
            assert 1 <= ctx <= len(table) * 16 and len(table) == -(-ctx // 16)  # the table covers the context
