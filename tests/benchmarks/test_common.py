"""The benchmarks' block-table layouts: what the decode benchmarks time must be what the runtime's allocator does."""
import pytest
import torch

from benchmarks.common import print_table, runtime_block_tables


def test_runtime_block_tables_prompts_then_interleaved_decode():
    # A fresh cache hands blocks out in order: each 128-token prompt gets 8 consecutive blocks, then every decode
    # step that starts a block gives one to each sequence in turn.
    tables = runtime_block_tables(3, 200, 16)
    assert tables.dtype == torch.int32 and tables.shape == (3, 13)
    for seq in range(3):
        assert tables[seq, :8].tolist() == list(range(8 * seq, 8 * seq + 8))
        assert tables[seq, 8:].tolist() == [24 + 3 * k + seq for k in range(5)]
    assert sorted(tables.flatten().tolist()) == list(range(39))  # exactly the blocks needed, each once


@pytest.mark.parametrize("batch,ctx,block_size,prompt", [(1, 1, 16, 128), (4, 40, 16, 128), (5, 1000, 32, 100),
                                                         (2, 4096, 16, 128), (7, 333, 8, 64)])
def test_runtime_block_tables_cover_each_context(batch, ctx, block_size, prompt):
    tables = runtime_block_tables(batch, ctx, block_size, prompt=prompt)
    blocks = -(-ctx // block_size)
    assert tables.shape == (batch, blocks)
    assert sorted(tables.flatten().tolist()) == list(range(batch * blocks))
    first = -(-min(prompt, ctx) // block_size)  # the prompt's blocks, consecutive
    for row in tables.tolist():
        assert row[:first] == list(range(row[0], row[0] + first))


def test_bench_rounds_ms_times_each_fn_in_turn():
    # Round after round, every fn is timed once per round, in the given order, so drift falls on all alike.
    from benchmarks.common import bench_rounds_ms

    calls = []
    times = bench_rounds_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert sorted(times) == ["a", "b"] and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]  # collapse repeats
    assert runs == ["a", "b"] * 3


def test_print_table_without_rows_prints_the_header(capsys):
    print_table([], ["peer", "tok_s"])
    assert capsys.readouterr().out.split() == ["peer", "tok_s"]
