#!/usr/bin/env bash
# Does MLX bound the host's run-ahead by its count of CUDA graphs in flight? Its eval waits once more than 10
# committed graphs are running, and a graph is committed every MLX_MAX_OPS_PER_BUFFER kernels (20 by default) or
# MLX_MAX_MB_PER_BUFFER megabytes; smaller graphs would then bound the run-ahead, and with it the peak, without the
# memory limit whose cache release costs the engine's memory bound its speed (bench/RESULTS.md, seventh session).
# The CLI, alternating run by run (bench/engine_pairs.py). On the lent GPU machine, after the first call of
# ../shared/tools/device-mlx-cuda.md:
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_runahead.sh probe     # carry [".device/b"]
#     bash .device/b/setup.sh >/dev/null && bash bench/gpu_runahead.sh graphs
# probe:  uniform rows: the memory bound, no bound, and no bound with graphs of 5 kernels or 10 MB.
# graphs: graphs of 6, 8 and 10 kernels as the only bound (no memory limit: --memory-limit-gb 100) against the
#         engine's memory bound and against no bound; uniform rows and mixed lengths. (Run as `engine` with the
#         engine of 8b4b7a6, which set graphs of 6 itself; reverted after this reading, bench/RESULTS.md.)
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/gpu_bench/ptx_session
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"
[ -d /tmp/gpu_bench/model ] || timeout 120 python3 bench/gpu_memory.py --prep
free=--memory-limit-gb=100
pairs() {  # seconds, then engine_pairs.py's arguments
    timeout "$1" python3 bench/engine_pairs.py "${@:2}" 2>&1 | grep -v Warning | tee -a "$out/runahead.txt"
}
case "$1" in
probe)
    pairs 420 --data uniform --rounds 3 --uniform-iters 60 --engines \
        "bound=.,free=.+$free,ops5=.+$free+MLX_MAX_OPS_PER_BUFFER=5,mb10=.+$free+MLX_MAX_MB_PER_BUFFER=10" ;;
graphs)
    ops=MLX_MAX_OPS_PER_BUFFER
    pairs 300 --data uniform --rounds 2 --uniform-iters 60 --engines "ops6=.+$free+$ops=6,memory=.,\
ops8=.+$free+$ops=8,ops10=.+$free+$ops=10,free=.+$free"
    pairs 120 --data mixed --rounds 1 --mixed-iters 60 --engines "ops6=.+$free+$ops=6,memory=.,ops8=.+$free+$ops=8" ;;
esac
date -u | tee -a "$out/card.txt"
