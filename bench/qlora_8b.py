"""QLoRA of an 8B-class model from start to adapter: our CLI against the unmodified `mlx_lm.lora` CLI, and the
configuration the app proposes for a 16 GB Mac.

    python3 bench/qlora_8b.py build --out DIR                 # the model and the data (about a minute on a GPU)
    python3 bench/qlora_8b.py run --out DIR [--sides mlx-lm,ours,ours-16gb]   # one epoch per side, in turn
    python3 bench/qlora_8b.py table --out DIR                 # the table of every recorded run
    .venv/bin/python bench/qlora_8b.py build|run --small       # every code path at toy sizes, on the CPU

The model has Llama-3.1-8B's shape (32 blocks, hidden 4096, MLP 14336, 32/8 heads, vocabulary 128,256) with
random weights quantized to 4 bits (group 64) by mlx-lm's own quantize_model, saved as a model folder that both
sides load. The tokenizer is tests/tiny.py's small BPE (its ids are valid in the large vocabulary). The data are
200 one-turn chat rows whose lengths spread evenly over 50-2000 tokens, trained for one epoch: LoRA rank 16,
alpha 32, all seven linear modules of all blocks, batch 4, max_seq_length 2048, AdamW lr 1e-5, no validation but
one batch at the start, the adapter saved at the end.

Each side runs as its own process from spawn to exit (model load, tokenizing, compiling, training, saving):
- mlx-lm: `python -m mlx_lm lora --config` with those settings (its `iters` is one epoch of batches);
- ours: `python -m lora_app train` with the same settings (`--epochs 1`, packed rows, the app's defaults);
- ours-16gb: ours with the change the app proposes when it sees a 16 GB Mac (memory.fitting_change for Metal and
  the working set macOS gives the GPU of a 16 GB Mac, MAC_16GB_WORKING_SET), run with the app seeing that memory;
- ours-unbounded (only when named): ours with MLX's memory limit above the GPU's memory, so the host allocates ahead
  of the GPU as far as it likes (run_ahead.py bounds that by default); likewise ours-16gb-unbounded;
- a side named with -qmm at the end (only when named: ours-qmm, ours-16gb-qmm) multiplies the frozen weights with
  the quantized matmul, as a Mac does, instead of CUDA's dequantized one (dequantized_matmul.py);
- a side named with -mbN (ours-mb1000, ours-16gb-mb100-unbounded) runs with MLX_MAX_MB_PER_BUFFER=N: the MB of
  kernel inputs MLX's CUDA backend gathers into one CUDA graph before it launches it (the CLI's default for
  training is run_ahead.GRAPH_MB; MLX's own is 1000 on an H100).
Both sides run with PyTorch hidden from transformers, as in their own installs (`peak`).
MLX's peak is the process's whole peak (mx.get_peak_memory() at exit, loading included), the same for both sides;
this file's `peak` command wraps each process for that. Our start-up comes from the run's events: spawn to the
trainer's start (imports), its phases (session.prepare's `startup`), and the first step (compiling).
MLX's CUDA backend compiles kernels at first use and caches them (MLX_PTX_CACHE_DIR, the same for both sides):
time the second round on a warm machine. Needs MLX's CUDA build, mlx-lm and this repository; no gradio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

ROWS, MIN_LEN, MAX_LEN, BATCH, RANK, ALPHA, LR = 200, 50, 2000, 4, 16, 32.0, 1e-5
MAX_SEQ = 2048
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What Metal's recommendedMaxWorkingSetSize reports on a 16 GB Apple-Silicon Mac (two thirds of its memory):
# the memory a 16 GB Mac's GPU may use, which memory.available_memory() reads there.
MAC_16GB_WORKING_SET = 16 * 2**30 * 2 // 3
# ours-16gb runs with the app's memory.available_memory() answering this variable's bytes: what it reads on a Mac,
# so the run's memory check and its run-ahead bound (run_ahead.py) act as they would there.
SEES_MEMORY = "QLORA_8B_SEES_MEMORY"
# A side run with this variable multiplies the frozen weights quantized, as Metal does (dequantized_matmul.py is
# CUDA's): what a Mac's run holds and how its time compares.
QUANTIZED_MATMUL = "QLORA_8B_QUANTIZED_MATMUL"


def use_sizes(small: bool) -> None:
    """Llama-3.1-8B's shape, or (--small) a toy llama with short rows and a working set it overflows."""
    global SHAPE, ROWS, MIN_LEN, MAX_LEN, MAX_SEQ, MAC_16GB_WORKING_SET
    from memory_estimate import LLAMA8B, TOY

    SHAPE = LLAMA8B
    if small:
        SHAPE, ROWS, MIN_LEN, MAX_LEN, MAX_SEQ, MAC_16GB_WORKING_SET = TOY, 64, 20, 200, 256, 30_000_000


# ---- the model and the data -------------------------------------------------------------------------------------

def build(out: Path) -> None:
    import random

    import mlx.core as mx
    from compare_cli import chat_rows
    from memory_estimate import build_model
    from mlx.utils import tree_flatten
    from tiny import build_tokenizer

    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(model_dir, 384)
    model = build_model(dict(model=SHAPE, dtype="bfloat16", bits=4))
    mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = dict(SHAPE, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
                  quantization={"group_size": 64, "bits": 4}, eos_token_id=2, bos_token_id=0)
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    # compare_cli's chat rows: one word of tiny's grammar is one token of its tokenizer
    chat_rows(out / "data", random.Random(0), ROWS, MIN_LEN, MAX_LEN, BATCH)
    print(f"built {model_dir} ({sum(f.stat().st_size for f in model_dir.iterdir()) / 1e9:.2f} GB) and the data")


# ---- one side -------------------------------------------------------------------------------------------------

def mlx_lm_command(out: Path, work: Path) -> list[str]:
    import yaml

    iters = ROWS // BATCH
    cfg = {"model": str(out / "model"), "train": True, "fine_tune_type": "lora", "data": str(out / "data"),
           "batch_size": BATCH, "iters": iters, "learning_rate": LR, "optimizer": "adamw",
           "optimizer_config": {"adamw": {"weight_decay": 0.0}}, "num_layers": -1, "max_seq_length": MAX_SEQ,
           "seed": 0, "lora_parameters": {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                          "keys": [f"self_attn.{m}" if m[0] in "qkvo" else f"mlp.{m}"
                                                   for m in MODULES]},
           "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 1, "save_every": 10**6,
           "adapter_path": str(work / "adapters"), "grad_checkpoint": False}
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    return ["-m", "mlx_lm", "lora", "--config", str(work / "config.yaml")]


def ours_command(out: Path, work: Path, extra: list[str]) -> list[str]:
    return ["-m", "lora_app", "train", "--model", str(out / "model"), "--data", str(out / "data"),
            "--batch-size", str(BATCH), "--epochs", "1", "--learning-rate", str(LR), "--optimizer", "adamw",
            "--rank", str(RANK), "--alpha", str(ALPHA), "--modules", ",".join(MODULES), "--layers", "all",
            "--max-seq-length", str(MAX_SEQ), "--seed", "0", "--steps-per-report", "10", "--steps-per-eval",
            "1000000", "--val-batches", "1", "--save-every", "1000000", "--out", str(work), *extra]


def proposal_for_16gb_mac(out: Path) -> tuple[str, list[str], dict]:
    """The change the app names for this run on a 16 GB Mac: (its words, our CLI flags for it, its estimate)."""
    from lora_app import memory
    from lora_app.catalog import info_from_config
    from lora_app.config import full_module_name
    from lora_app.lora import count_for

    info = info_from_config(json.loads((out / "model" / "config.json").read_text()))
    modules = [full_module_name(m) for m in MODULES]
    trainable = count_for(info["module_shapes"], modules, info["num_blocks"], RANK)
    change = memory.fitting_change(info, trainable, BATCH, MAX_SEQ, False, MAC_16GB_WORKING_SET, backend="metal",
                                   modules=modules, longest_row=MAX_LEN)
    if not change:
        raise SystemExit("the app proposes nothing that fits a 16 GB Mac")
    return change.words, flags_for(change.settings), change.estimate


def flags_for(settings: dict) -> list[str]:
    flags = ["--grad-checkpoint"] if settings.get("grad_checkpoint") else []
    for name in ("batch_size", "max_seq_length"):
        if name in settings:
            flags += [f"--{name.replace('_', '-')}", str(settings[name])]
    return flags


def run_side(side: str, out: Path, round_no: int) -> dict:
    from compare_cli import summarize_events

    from lora_app import runs

    work = out / f"{side}-{round_no}"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    proposal = None
    if side == "mlx-lm":
        args = mlx_lm_command(out, work)
    else:
        extra: list[str] = []
        if side.startswith("ours-16gb"):
            words, extra, estimate = proposal_for_16gb_mac(out)
            proposal = {"words": words, "flags": extra, "estimate_gb": estimate["total"] / 1e9}
        if "-unbounded" in side:  # a limit above any GPU's memory: what the run-ahead bound costs in speed
            extra = [*extra, "--memory-limit-gb", "1000"]
        args = ours_command(out, work, extra)
    cmd = [sys.executable, __file__, "peak", *args]
    env = runs.engine_env()
    if side.startswith("ours-16gb"):  # the app on this GPU sees a 16 GB Mac's memory, as in the proposal
        env[SEES_MEMORY] = str(MAC_16GB_WORKING_SET)
    if side.endswith("-qmm"):  # the frozen weights multiplied quantized, as on a Mac (dequantized_matmul.py)
        env[QUANTIZED_MATMUL] = "1"
    if graph_mb := re.search(r"-mb(\d+)", side):
        env["MLX_MAX_MB_PER_BUFFER"] = graph_mb[1]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    end = time.time()
    (out / f"{side}-{round_no}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:  # recorded, and the next side still runs: a GPU lease is too short to start over
        return record({"side": side, "round": round_no, "failed": proc.returncode, "proposal": proposal,
                       "why": proc.stderr.strip().splitlines()[-1:] or [""]}, out)
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("MLX_PEAK "))
    result = {"side": side, "round": round_no, "wall_s": end - start, "peak_gb": peak / 1e9, "proposal": proposal}
    if side != "mlx-lm":
        events = runs.read_events(work)
        summary = summarize_events(work, start, end, None)
        ready = next(e for e in events if "startup" in e)
        first = next(e for e in events if e["event"] == "first_step")
        trainer_start = first["time"] - first["seconds"]
        result |= {"steps": summary["steps"], "tokens": summary["tokens"], "tok_s": summary["tok_s"],
                   "startup": {"imports and CLI": trainer_start - start, **ready["startup"],
                               "first step (compile + run)": first["time"] - ready["time"]},
                   "first_step_s": first["time"] - start, "train_peak_gb": summary["mlx_peak_gb"],
                   "step_1_peak_gb": first.get("peak_memory_gb")}
    else:
        result |= {"steps": ROWS // BATCH}
    return record(result, out)


def record(result: dict, out: Path) -> dict:
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def peak(args: list[str]) -> None:
    """Run `-m MODULE ARGS...` in this process and print MLX's peak memory when it ends."""
    import atexit
    import runpy

    # Neither side's own install has PyTorch (requirements.txt; mlx-lm's requirements), and transformers imports it
    # whenever it can find it: a GPU machine's Python often has it (bench/load_probe.py times the difference).
    sys.modules["torch"] = None  # type: ignore[assignment]
    if os.environ.get(SEES_MEMORY):
        from lora_app import memory

        memory.available_memory = lambda device=None: (int(os.environ[SEES_MEMORY]), SEES_MEMORY)
    if os.environ.get(QUANTIZED_MATMUL):
        from lora_app import dequantized_matmul

        dequantized_matmul.wanted = lambda: False
    # mlx.core is imported at exit only: nothing here starts MLX before the CLI has set its environment
    # (run_ahead.set_graph_size)
    atexit.register(lambda: print(f"MLX_PEAK {importlib.import_module('mlx.core').get_peak_memory()}", flush=True))
    assert args[0] == "-m"
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)


# ---- the table -----------------------------------------------------------------------------------------------

def table(out: Path) -> str:
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    last_round = max(r["round"] for r in results)
    rows = [r for r in results if r["round"] == last_round]
    failed = [r for r in rows if r.get("failed")]
    rows = [r for r in rows if not r.get("failed")]
    base = next((r for r in rows if r["side"] == "mlx-lm"), None)
    lines = ["| side | steps | wall, start to adapter (s) | × mlx-lm's time | MLX peak (GB) | × mlx-lm's peak | "
             "step 1's peak (GB) | start to first step done (s) | tokens/s |", "|---" + "|---:" * 8 + "|"]
    for r in rows:
        time_ratio = f"{r['wall_s'] / base['wall_s']:.2f}" if base else "-"
        # goal 2 compares with the unconstrained run with the same modifiers (ours-qmm for ours-16gb-qmm)
        unconstrained = r["side"].replace("-16gb", "").replace("-unbounded", "")
        ours = next((o for o in rows if o["side"] == unconstrained), None)
        if ours and r["side"] != unconstrained and r["side"].startswith("ours"):
            time_ratio += f" ({r['wall_s'] / ours['wall_s']:.2f} × {unconstrained})"
        peak_ratio = f"{r['peak_gb'] / base['peak_gb']:.2f}" if base else "-"
        label = r["side"] + (f" ({r['proposal']['words']})" if r.get("proposal") else "")
        lines.append(f"| {label} | {r['steps']} | {r['wall_s']:.1f} | {time_ratio} | {r['peak_gb']:.2f} | "
                     f"{peak_ratio} | {r.get('step_1_peak_gb') or float('nan'):.2f} | "
                     f"{r.get('first_step_s', float('nan')):.1f} | {r.get('tok_s', float('nan')):,.0f} |")
    for r in failed:
        lines.append(f"\n{r['side']} failed (exit code {r['failed']}): {r['why'][0]}")
    for r in rows:
        if r.get("startup"):
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in r["startup"].items())
            lines.append(f"\n{r['side']} start-up: {parts}")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["peak"]:  # the wrapped command's own flags are not this script's
        return peak(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("build", "run", "table"))
    ap.add_argument("--out", default="/tmp/qlora8b")
    ap.add_argument("--sides", default="mlx-lm,ours,ours-16gb")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="toy sizes: a check of every code path on the CPU")
    a = ap.parse_args()
    use_sizes(a.small)
    out = Path(a.out)
    if a.command == "build":
        return build(out)
    if a.command == "run":
        for side in a.sides.split(","):
            run_side(side, out, a.round)
    print(table(out))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
