#!/usr/bin/env bash
# Issue 8's GPU table (the bf16 matmul ceiling; the bare compiled steps of this engine and mlx-lm's, q/v and all 7,
# in interleaved rounds; PyTorch+PEFT eager and torch.compile; both training loops) with the current engine, part
# by part, so a call cut short still returns every part that finished. The parts' results collect in
# /tmp/gpu_session/results.txt, which stays while the lent machine is warm, so the table may take two calls back to
# back (the parts' time limits add up to 14 minutes, a call gets 10; they ran in 7 on an H200); a machine that
# already made a table appends to it, so remove that folder first for a new one. On the lent GPU machine, after
# the first call of ../shared/tools/device-mlx-cuda.md parked half the MLX wheel in /tmp:
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_table.sh ceiling mlx_steps       # carry [".device/b"]
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_table.sh torch mlx_lm_train ours_loop
# (no arguments: every part), where .device/b also holds the accelerate and psutil wheels that PEFT imports:
#     pip download accelerate==1.15.0 psutil --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux2014_x86_64 -d .device/b
keep=/tmp/gpu_session
mkdir -p "$keep"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/gpu_bench/ptx_session
declare -A seconds=([ceiling]=40 [mlx_steps]=420 [torch]=150 [mlx_lm_train]=110 [ours_loop]=110)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(ceiling mlx_steps torch mlx_lm_train ours_loop)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$keep/card.txt"
date -u | tee -a "$keep/card.txt"
for p in "${parts[@]}"; do
    timeout "${seconds[$p]:?unknown part $p}" python3 bench/gpu_bench.py --part "$p" 2>&1 \
        | grep -E "^RESULT|Error" | tee -a "$keep/results.txt"
done
python3 bench/gpu_bench.py --report-from "$keep/results.txt" | tee "$keep/table.md"
date -u | tee -a "$keep/card.txt"
[ -n "$OUT" ] && cp "$keep"/* "$OUT"/
true
