#!/usr/bin/env bash
# The GPU calls behind bench/RESULTS.md's sections on the loss through the LM head in chunks (fifth and sixth
# sessions). Run on the lent GPU
# machine after the first call of ../shared/tools/device-mlx-cuda.md parked half the MLX wheel in /tmp:
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh memory      # a fresh machine
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh tight       # a fresh machine
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh final       # a fresh machine: the engine of dbcf149
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh pairs       # carry [".device/b", ".device/old"]
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh headroom    # carry [".device/b", ".device/old", ".device/c27"]
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh sweep       # carry [".device/b", ".device/h3", ".device/h4"]
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh limits      # carry [".device/b", ".device/old"]
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh bf16        # carry [".device/b", ".device/old", ".device/cur"]
#     bash .device/b/setup.sh && bash bench/gpu_head_loss.sh verify      # carry [".device/b", ".device/cur"]
# where .device/old holds the engine to compare with, made here by
#     mkdir -p .device/old && git archive 5e73e6c lora_app | tar -x -C .device/old
# and .device/c27 the engine of 57552f9 with the head loss in chunks of 2^27 logits instead of 2^26:
#     mkdir -p .device/c27 && git archive 57552f9 lora_app | tar -x -C .device/c27
#     sed -i 's/^CHUNK_ELEMENTS = 2\*\*26/CHUNK_ELEMENTS = 2**27/' .device/c27/lora_app/head_loss.py
# and .device/cur the engine before the chunks kept the model's dtype (57552f9: float32 chunks of 2^26 logits):
#     mkdir -p .device/cur && git archive 57552f9 lora_app | tar -x -C .device/cur
# and .device/h3, .device/h4 the engine of 57552f9 with a run-ahead headroom of 3 and 4 GB instead of 2:
#     mkdir -p .device/h3 && git archive 57552f9 lora_app | tar -x -C .device/h3
#     sed -i 's/^RUN_AHEAD_MIN_HEADROOM = 2e9/RUN_AHEAD_MIN_HEADROOM = 3e9/' .device/h3/lora_app/trainer.py  (4e9: h4)
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
headroom)  # the 2 GB run-ahead headroom (d390764) against 5e73e6c and against 2^27-logit chunks, then mlx-lm
    timeout 90 python3 bench/gpu_memory.py --prep
    timeout 330 python3 bench/engine_pairs.py --engines new=.,old=.device/old,c27=.device/c27 --rounds 3 2>&1 \
        | grep -v Warning | tee -a "$out/pairs.txt"
    timeout 110 python3 bench/gpu_bench.py --part mlx_lm_train 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loops.txt" ;;
sweep)  # the run-ahead headroom at 2, 3 and 4 GB, then mlx-lm's train() (speed against peak memory)
    timeout 90 python3 bench/gpu_memory.py --prep
    timeout 320 python3 bench/engine_pairs.py --engines h2=.,h3=.device/h3,h4=.device/h4 --rounds 2 2>&1 \
        | grep -v Warning | tee -a "$out/pairs.txt"
    timeout 100 python3 bench/gpu_bench.py --part mlx_lm_train 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loops.txt" ;;
limits)  # chunked (this engine) and plain (.device/old) loss at one user-set limit (9.1 GB); chunked unbounded
    timeout 90 python3 bench/gpu_memory.py --prep
    timeout 240 python3 bench/engine_pairs.py --data uniform --rounds 2 --engines \
        "new=.,new9=.+--memory-limit-gb=9.1,old9=.device/old+--memory-limit-gb=9.1,new100=.+--memory-limit-gb=100" \
        2>&1 | grep -v Warning | tee -a "$out/pairs.txt" ;;
bf16)  # chunks in the model's dtype (this checkout) against float32 chunks (.device/cur) and the plain loss (old)
    timeout 90 python3 bench/gpu_memory.py --prep
    timeout 300 python3 bench/engine_pairs.py --rounds 2 --engines new=.,cur=.device/cur,old=.device/old 2>&1 \
        | grep -v Warning | tee -a "$out/pairs.txt" ;;
verify)  # the landed chunks (fused cross-entropy, model dtype) on the device, then against 57552f9's, and mlx-lm
    timeout 60 python3 bench/head_loss_check.py 2>&1 | grep -v Warning | tee -a "$out/check.txt"
    timeout 90 python3 bench/gpu_memory.py --prep
    timeout 280 python3 bench/engine_pairs.py --rounds 3 --engines new=.,cur=.device/cur 2>&1 | grep -v Warning \
        | tee -a "$out/pairs.txt"
    timeout 100 python3 bench/gpu_bench.py --part mlx_lm_train 2>&1 | grep -E "^RESULT|Error" | tee -a "$out/loops.txt" ;;
esac
date -u | tee -a "$out/card.txt"
