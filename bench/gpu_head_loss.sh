#!/usr/bin/env bash
# The GPU calls behind bench/RESULTS.md's "loss through the LM head in ordered chunks" section. Run on the lent GPU
# machine after the first call of ../shared/tools/device-mlx-cuda.md parked half the MLX wheel in /tmp:
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh memory      # a fresh machine
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh tight       # a fresh machine
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh final       # a fresh machine: the engine of dbcf149
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh pairs       # carry [".device/b", ".device/old"]
# where .device/old holds the engine to compare with, made here by
#     mkdir -p .device/old && git archive 5e73e6c lora_app | tar -x -C .device/old
# Each step has its own time limit and its output lands under $OUT (or /tmp/gpu_session) as soon as it ends, so a
# call cut short still returns what finished. One kernel cache for all steps.
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/gpu_bench/ptx_session
variants() {
    for v in "$@"; do
        timeout 120 python3 bench/gpu_memory.py --variant "$v" 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loop.txt"
    done
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/card.txt"
date -u | tee -a "$out/card.txt"
case "$1" in
tight)  # step 1 under a memory limit (its peak is then what the step needs), the loop at factors of that
    timeout 90 python3 bench/gpu_memory.py --prep
    variants "tight step 1 then 1.1x" "tight step 1 then 1.1x (plain logits loss)" "mixed tight step 1 then 1.1x" \
             "mixed tight step 1 then 1.1x (plain logits loss)" "tight step 1 then 1.3x" "mixed tight step 1 then 1.3x" \
             "tight step 1 then 1.6x" "mixed tight step 1 then 1.6x" ;;
memory)  # step 1's peak and the bounded loop, the chunked loss (the engine) against the plain logits loss
    timeout 90 python3 bench/gpu_memory.py --prep
    variants "ahead+limit 1.1x step 1" "ahead+limit 1.1x step 1 (plain logits loss)" \
             "mixed ahead+limit 1.1x step 1" "mixed ahead+limit 1.1x step 1 (plain logits loss)" \
             "ahead+limit 1.5x step 1" "mixed ahead+limit 1.5x step 1"
    timeout 150 python3 bench/gpu_bench.py --part ours_loop --loop-data uniform,mixed 2>&1 \
        | grep -E "^RESULT|Error" | tee -a "$out/loops.txt" ;;
final)  # the engine (chunked head loss, tight step 1, 1.1x) through the CLI against mlx-lm's train(), and curves
    timeout 90 python3 bench/gpu_memory.py --prep
    timeout 170 python3 bench/gpu_bench.py --part ours_loop 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loops.txt"
    timeout 150 python3 bench/gpu_bench.py --part mlx_lm_train 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loops.txt"
    timeout 100 python3 bench/gpu_bench.py --part ours_loop --loop-data uniform 2>&1 | grep -E "^RESULT|Error" \
        | tee -a "$out/loops.txt"
    variants "curve lr 2e-4" "curve lr 2e-4 (plain logits loss)" ;;
pairs)  # this checkout's engine against .device/old's, alternating through the CLI (bench/engine_pairs.py)
    timeout 90 python3 bench/gpu_memory.py --prep
    timeout 420 python3 bench/engine_pairs.py --engines new=.,old=.device/old --rounds 3 2>&1 | grep -v Warning \
        | tee -a "$out/pairs.txt" ;;
esac
date -u | tee -a "$out/card.txt"
