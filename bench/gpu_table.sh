#!/usr/bin/env bash
# The GPU table (bench/README.md): the bf16 matmul ceiling; the bare compiled steps of this engine and mlx-lm's,
# q/v and all 7, in interleaved rounds; PyTorch+PEFT eager and torch.compile; both training loops. Runs
# bench/gpu_bench.py part by part, each under its own time limit, so a call cut short keeps every part that
# finished. Results collect in bench/out/gpu/session/results.txt (kept while the machine stays warm), so the table
# may take two calls back to back; remove that folder to start a new table.
#     bash bench/gpu_table.sh                                  # every part
#     bash bench/gpu_table.sh ceiling mlx_steps                # then, on the same machine:
#     bash bench/gpu_table.sh torch mlx_lm_train ours_loop
# Needs python3 with MLX's CUDA build, mlx-lm, PyTorch, transformers and PEFT; bench/README.md says how the lent
# GPU machine gets them.
cd "$(dirname "$0")/.." || exit 1
keep=bench/out/gpu/session
mkdir -p "$keep"
export PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-$PWD/bench/out/gpu/ptx}
declare -A seconds=([prep]=120 [ceiling]=40 [mlx_steps]=420 [torch]=150 [mlx_lm_train]=110 [ours_loop]=110)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(ceiling mlx_steps torch mlx_lm_train ours_loop)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$keep/card.txt"
date -u | tee -a "$keep/card.txt"
git log -1 --format=%h 2>/dev/null | tee -a "$keep/card.txt"
for p in "${parts[@]}"; do
    timeout "${seconds[$p]:?unknown part $p}" python3 bench/gpu_bench.py --part "$p" 2>&1 \
        | grep -E "^RESULT|Error" | tee -a "$keep/results.txt"
done
python3 bench/gpu_bench.py --report-from "$keep/results.txt" | tee "$keep/table.md"
date -u | tee -a "$keep/card.txt"
[ -n "$OUT" ] && cp "$keep"/* "$OUT"/
true
