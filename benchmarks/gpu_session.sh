#!/usr/bin/env bash
# Everything a GPU session checks, in three device calls of under 10 minutes each; logs and JSON land in $OUT.
#   bash benchmarks/gpu_session.sh tests     # every test natively on the GPU (kernels, passes, runtime, CUDA graphs)
#   bash benchmarks/gpu_session.sh bench     # bench_ops, bench_generate (8B shape, with a profile)
#   bash benchmarks/gpu_session.sh serving   # warm-cache start-up (run after bench on the same machine), bench_serving
#   bash benchmarks/gpu_session.sh linear    # the streaming-linear sweep against cuBLAS (tune_linear.py) and start-up
#                                            # profiles of a cold and a warm process
#   bash benchmarks/gpu_session.sh decode    # decode over a serving run's block layouts, and the wave tilings of the
#                                            # head_dim-64 row (Llama-3.2-1B) over the runtime's layout
#   bash benchmarks/gpu_session.sh prefill   # a batch-1 prefill's kernels (8B shape, profiled) and each prefill-sized
#                                            # projection on cuBLAS, cuBLASLt and Inductor's autotuned GEMMs
#   bash benchmarks/gpu_session.sh norms     # norms split into the projections around them against norm kernels
#                                            # (8B shape): batch 1 in both orders, then batch 16 and 64
# Run from the repository root on the GPU machine (torch/triton/transformers preinstalled; nothing to install).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"

stage() {  # stage NAME SECONDS CMD...: one bounded step; its whole output goes to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "== $name exit $?"
    tail -n 25 "$OUT/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
    tests)
        stage gpu_tests 540 python -m pytest -q -p no:cacheprovider --durations=10 tests ;;
    bench)
        stage bench_ops 120 python -m benchmarks.bench_ops --out "$OUT"
        stage bench_generate 420 python -m benchmarks.bench_generate --model llama3-8b --batch 1,16,64 \
            --peers cinfer,cinfer_sync,hf_static --profile 32 --out "$OUT" ;;
    serving)
        # A second process finds warm Inductor/Triton caches: its cinfer start-up is the warm-cache figure.
        stage startup_warm 150 python -m benchmarks.bench_generate --model llama3-8b --batch 1 --new-tokens 64 \
            --peers cinfer --out "$OUT/warm"
        stage bench_serving 400 python -m benchmarks.bench_serving --model llama3-1b \
            --peers cinfer,hf_padded --repeats 3 --out "$OUT" ;;
    linear)
        stage tune_linear 270 python benchmarks/tune_linear.py --out "$OUT"
        stage startup_cold 150 python -m benchmarks.profile_startup --model llama3-8b --max-num-seqs 64 --out "$OUT/cold"
        stage startup_warm 120 python -m benchmarks.profile_startup --model llama3-8b --max-num-seqs 64 --out "$OUT/warm" ;;
    decode)
        stage decode_layouts 200 python -m benchmarks.bench_decode_layouts --out "$OUT"
        stage wave_d64 330 python benchmarks/tune_paged_attention.py --decode-sweep --candidates wave \
            --shapes b64x384w8192d64,b128x512w8192d64,b256x512d64,b64x4096d64 --out "$OUT" ;;
    prefill)
        stage prefill_profile 240 python -m benchmarks.bench_generate --model llama3-8b --batch 1 --peers cinfer \
            --profile 1 --out "$OUT"
        stage prefill_linear 300 python -m benchmarks.bench_prefill_linear --rows 128 --out "$OUT" ;;
    norms)
        stage norms_tests 170 python -m pytest -q -p no:cacheprovider tests/ops/test_norm_linear.py \
            tests/graph_passes/test_norm_split_pass.py tests/runtime/test_engine_gpu.py
        stage norms_b1 150 python -m benchmarks.bench_generate --model llama3-8b --batch 1 \
            --peers cinfer,cinfer_norms --out "$OUT/norms_b1"
        stage norms_b1_reversed 150 python -m benchmarks.bench_generate --model llama3-8b --batch 1 \
            --peers cinfer_norms,cinfer --out "$OUT/norms_b1_reversed"
        stage norms_b16_64 200 python -m benchmarks.bench_generate --model llama3-8b --batch 16,64 \
            --peers cinfer,cinfer_norms --out "$OUT/norms_b16_64" ;;
    *)
        echo "usage: bash benchmarks/gpu_session.sh tests|bench|serving|linear|decode|prefill|norms" >&2
        exit 2 ;;
esac
