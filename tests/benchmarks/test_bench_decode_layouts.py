"""bench_decode_layouts end to end at its CPU smoke size: three layouts of three serving steps, each checked against
the op's float32 reference before it is timed (the script exits on a wrong output)."""
from benchmarks import bench_decode_layouts
from benchmarks.bench_decode_layouts import consecutive_tables


def test_smoke_run(tmp_path, capsys):
    assert bench_decode_layouts.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench_decode_layouts.json").exists()
    out = capsys.readouterr().out
    for layout in ("serving", "consecutive", "random"):
        assert layout in out


def test_consecutive_tables_cover_each_context_once():
    assert consecutive_tables([1, 16, 17, 100]) == [[0], [1], [2, 3], [4, 5, 6, 7, 8, 9, 10]]
