#!/usr/bin/env bash
# The GPU calls behind bench/RESULTS.md's seventh-session section: what MLX's allocator does under the engine's
# run-ahead bound, and the engine against mlx-lm's train() in one call. Run on the lent GPU machine after the first
# call of ../shared/tools/device-mlx-cuda.md parked half the MLX wheel in /tmp:
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_alloc.sh alloc    # carry [".device/b"]
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_alloc.sh ratio    # carry [".device/b"]
# Each step has its own time limit and its output lands under $OUT (or /tmp/gpu_session) as soon as it ends.
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/gpu_bench/ptx_session
w=/tmp/gpu_bench
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"
[ -d $w/model ] || timeout 90 python3 bench/gpu_memory.py --prep
train_args() {  # the engine_pairs.py run: 0.5B Qwen2 shape, q/v rank 8, batch 8, packed rows of up to 1024
    echo train --model $w/model --data $w/$1 --batch-size 8 --iters $2 --rank 8 --alpha 16 --learning-rate 1e-5 \
        --max-seq-length 1024 --batching packed --steps-per-report 10 --steps-per-eval 0 --save-every $2 \
        --out $w/alloc/$3-$1-$RANDOM
}
case "$1" in
alloc)  # allocator and synchronizing calls per step, bounded (the engine) and unbounded
    for data in uniform mixed; do
        timeout 100 python3 bench/alloc_calls.py --label "bound $data" -- $(train_args $data 40 bound) 2>&1 \
            | grep -E "^RESULT|Error" | tee -a "$out/alloc.txt"
        timeout 100 python3 bench/alloc_calls.py --label "free $data" -- $(train_args $data 40 free) \
            --memory-limit-gb 100 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/alloc.txt"
    done ;;
ratio)  # mlx-lm's train() on both datasets, then the engine bounded and unbounded, alternating
    timeout 200 python3 bench/gpu_bench.py --part mlx_lm_train 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loops.txt"
    timeout 220 python3 bench/engine_pairs.py --rounds 2 --engines "bound=.,free=.+--memory-limit-gb=100" 2>&1 \
        | grep -v Warning | tee -a "$out/pairs.txt" ;;
esac
date -u | tee -a "$out/card.txt"
