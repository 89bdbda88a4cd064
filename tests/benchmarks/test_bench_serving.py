"""bench_serving's cinfer runner on the built-in tiny model (CPU): every request finishes with the tokens it asked
for, and repeated runs on one engine report the median run and each run's rate."""
import torch

from benchmarks.bench_serving import run_cinfer, workload
from benchmarks.models import load_model


def test_run_cinfer_repeats_report_the_median_run():
    model = load_model("tiny", torch.float32, "cpu")
    prompts, olens = workload(6, model.config.vocab_size, (3, 9), (2, 5))
    row = run_cinfer(model, prompts, olens, max_num_seqs=4, repeats=3)
    assert len(row["tok_s_runs"]) == 3 and all(r > 0 for r in row["tok_s_runs"])
    assert round(row["tok_s"]) == sorted(row["tok_s_runs"])[1]
    assert row["p50_s"] <= row["p99_s"] <= row["elapsed_s"]
    assert row["compiled_in_run"]["dynamo_graphs"] == 0  # the warm-up compiled everything the runs use
    assert "tok_s_runs" not in run_cinfer(model, prompts, olens, max_num_seqs=4)  # one run: no list
