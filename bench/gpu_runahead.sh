#!/usr/bin/env bash
# Does MLX bound the host's run-ahead by its count of CUDA graphs in flight? Its eval waits once more than 10
# committed graphs are running, and a graph is committed every MLX_MAX_OPS_PER_BUFFER kernels (20 by default) or
# MLX_MAX_MB_PER_BUFFER megabytes; smaller graphs would then bound the run-ahead, and with it the peak, without the
# memory limit whose cache release costs the engine's bound its speed (bench/RESULTS.md, seventh session). The CLI
# on the uniform rows, alternating: the engine (its memory bound), no bound, and no bound with smaller graphs.
# On the lent GPU machine, after the first call of ../shared/tools/device-mlx-cuda.md:
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_runahead.sh      # carry [".device/b"]
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/gpu_bench/ptx_session
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"
[ -d /tmp/gpu_bench/model ] || timeout 120 python3 bench/gpu_memory.py --prep
free=--memory-limit-gb=100
timeout 420 python3 bench/engine_pairs.py --data uniform --rounds 3 --uniform-iters 60 --engines \
    "bound=.,free=.+$free,ops5=.+$free+MLX_MAX_OPS_PER_BUFFER=5,mb10=.+$free+MLX_MAX_MB_PER_BUFFER=10" 2>&1 \
    | grep -v Warning | tee -a "$out/runahead.txt"
date -u | tee -a "$out/card.txt"
