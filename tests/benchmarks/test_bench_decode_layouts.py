"""bench_decode_layouts end to end at its CPU smoke size: three layouts of three serving steps, each checked against
the float32 reference before it is timed (the script exits on a wrong output)."""
import torch

from benchmarks import bench_decode_layouts
from benchmarks.bench_decode_layouts import consecutive_tables, random_tables


def test_smoke_run(tmp_path, capsys):
    assert bench_decode_layouts.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench_decode_layouts.json").exists()
    out = capsys.readouterr().out
    for layout in ("serving", "consecutive", "random"):
        assert layout in out


def test_layouts_cover_each_context_once():
    contexts = [1, 16, 17, 100]
    blocks = [1, 1, 2, 7]
    assert consecutive_tables(contexts) == [[0], [1], [2, 3], [4, 5, 6, 7, 8, 9, 10]]
    drawn = random_tables(contexts, 50, torch.Generator().manual_seed(0))
    assert list(map(len, drawn)) == blocks
    flat = [b for t in drawn for b in t]
    assert len(set(flat)) == len(flat) and all(0 <= b < 50 for b in flat)
