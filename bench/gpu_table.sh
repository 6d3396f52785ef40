#!/usr/bin/env bash
# Issue 8's GPU table (the bf16 matmul ceiling; the bare compiled steps of this engine and mlx-lm's, q/v and all 7;
# PyTorch+PEFT eager and torch.compile; both training loops) with the current engine, in one device call, part by
# part, so a call cut short still returns every part that finished. On the lent GPU machine, after the first call
# of ../shared/tools/device-mlx-cuda.md parked half the MLX wheel in /tmp:
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_table.sh     # carry [".device/b"]
# where .device/b also holds the accelerate and psutil wheels that PEFT imports:
#     pip download accelerate==1.15.0 psutil --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux2014_x86_64 -d .device/b
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/gpu_bench/ptx_session
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"
part() {  # part name, seconds, extra arguments
    timeout "$2" python3 bench/gpu_bench.py --part "$1" "${@:3}" 2>&1 | grep -E "^RESULT|Error" \
        | tee -a "$out/results.txt"
}
part ceiling 40
part mlx_steps 170
part torch 120
part mlx_lm_train 100
part ours_loop 100
python3 bench/gpu_bench.py --report-from "$out/results.txt" | tee "$out/table.md"
date -u | tee -a "$out/card.txt"
