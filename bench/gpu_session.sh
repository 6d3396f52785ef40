#!/usr/bin/env bash
# The GPU call behind bench/RESULTS.md's "LoRA path in bf16" section: run on the lent GPU machine as the second
# device call of ../shared/tools/device-mlx-cuda.md (after the first parked half the MLX wheel in /tmp):
#     bash .device/b/setup.sh && bash bench/gpu_session.sh
# Each step has its own time limit and writes its output under $OUT (or /tmp/gpu_session) as soon as it ends, so
# a call cut short still returns what finished. One kernel cache for all steps, empty at the start.
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/gpu_bench/ptx_session
rm -rf "$MLX_PTX_CACHE_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
date -u | tee -a "$out/card.txt"
timeout 90 python3 bench/gpu_memory.py --prep
# bare compiled steps: q/v and all 7 modules, our bf16 low-rank path vs mlx-lm's float32 one
timeout 220 python3 bench/gpu_bench.py --parts=ceiling,mlx_steps --part-timeout 210 --json "$out/steps.json" \
    2>&1 | tee "$out/steps.txt"
# loss curves (bf16 vs float32 path, and a second seed), then peak memory of the loop, uniform and mixed
for v in "curve lr 2e-4" "curve lr 2e-4 (float32 LoRA path)" "curve lr 2e-4 (float32 LoRA path; seed 1)" \
         "ahead+limit 1.1x step 1" "ahead+limit 1.1x step 1 (float32 LoRA path)" \
         "mixed ahead+limit 1.1x step 1" "mixed ahead+limit 1.1x step 1 (float32 LoRA path)"; do
    timeout 80 python3 bench/gpu_memory.py --variant "$v" 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loop.txt"
done
# the loops end to end: ours through the CLI (the app's path), mlx-lm's train()
timeout 150 python3 bench/gpu_bench.py --part ours_loop 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loops.txt"
timeout 150 python3 bench/gpu_bench.py --part mlx_lm_train 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loops.txt"
date -u | tee -a "$out/card.txt"
