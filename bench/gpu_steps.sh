#!/usr/bin/env bash
# The bare compiled steps, in interleaved rounds in one process each (the readings that separate calls cannot give:
# bench/RESULTS.md, seventh session): mlx-lm's q/v step against ours with the head loss in chunks and with the
# plain logits loss (gpu_pairs.py steps); then the all-linear step against q/v, profiled kernel by kernel, with A
# and B in float32 (the engine) and in bf16 (lora_kernels.py's "bf16 params": the most that bf16 copies of them
# could save). On the lent GPU machine, after the first call of ../shared/tools/device-mlx-cuda.md:
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_steps.sh     # carry [".device/b"]
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/gpu_bench/ptx_session
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"
timeout 200 python3 bench/gpu_pairs.py --parts steps --rounds 5 --part-timeout 190 2>&1 | grep -v Warning \
    | tee -a "$out/steps.txt"
timeout 330 python3 bench/lora_kernels.py --parts profile,paths --paths "engine;bf16 params" --rounds 5 \
    --part-timeout 160 2>&1 | grep -v Warning | tee -a "$out/lora7.txt"
date -u | tee -a "$out/card.txt"
