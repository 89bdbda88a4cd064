"""A second process finds the first one's compile in the on-disk caches: Inductor's FX graph cache and
AOTAutograd's cache both hit, so a restart does not trace AOTAutograd again. Each process runs with another
PYTHONHASHSEED, as separate Python processes do: anything in the cache key that depends on string hashing (the
order of a set of names, say) would make every restart miss."""
import json
import os
import subprocess
import sys

_SCRIPT = """
import json, torch
from graph_passes import compile_model
from tests.graph_passes.tiny_models import make_caches, make_model, run_scenario
from tests.tolerances import LOGITS
model = make_model("llama3_gqa_rope_scaling", num_hidden_layers=1)
paged = compile_model(model, *make_caches(model), inner_backend="inductor")
run_scenario(model, paged, LOGITS)
counters = torch._dynamo.utils.counters
print(json.dumps({**dict(counters["inductor"]), **dict(counters["aot_autograd"]), "pieces": paged.split_report.compiled}))
"""


def _compile_in_subprocess(cache_dir: str, hash_seed: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONHASHSEED": str(hash_seed),
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_hits_inductor_and_aot_caches(tmp_path):
    cold = _compile_in_subprocess(str(tmp_path), hash_seed=1)
    pieces = cold["pieces"]  # compiled separately (layer_split): the prologue, the layer, the epilogue
    assert pieces == 3
    assert cold.get("fxgraph_cache_miss") == pieces and cold.get("autograd_cache_saved") == pieces, cold
    warm = _compile_in_subprocess(str(tmp_path), hash_seed=2)
    assert warm.get("fxgraph_cache_hit") == pieces and warm.get("autograd_cache_hit") == pieces, warm
    assert not warm.get("fxgraph_cache_miss") and not warm.get("autograd_cache_miss"), warm
