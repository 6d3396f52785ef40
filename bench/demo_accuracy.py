"""The demo's measure: exact match of the base model and of an adapter trained with the demo defaults.

    .venv/bin/python bench/demo_accuracy.py [--iters 200] [--out bench/out/demo] [--write FILE.md]

Trains with `python -m lora_app train --model demo --data demo` (every other setting at its default), evaluates
base and adapter on assets/demo_data/test.jsonl, prints a markdown table (and appends it to --write's file).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_app import runs  # noqa: E402


def train(out: Path, iters: int) -> float:
    cmd = [sys.executable, "-m", "lora_app", "train", "--model", "demo", "--data", "demo", "--out", str(out),
           "--iters", str(iters)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=runs.engine_env())
    return time.perf_counter() - start


def evaluate(adapter: Path | None) -> dict:
    cmd = [sys.executable, "-c", "import json, sys; from lora_app.evaluate import evaluate_task; "
           "r = evaluate_task('demo', sys.argv[1] or None, 'assets/demo_data'); r.pop('examples'); "
           "print(json.dumps(r))",
           str(adapter or "")]
    result = subprocess.run(cmd, check=True, cwd=ROOT, env=runs.engine_env(), capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / time.strftime("demo-%Y%m%d-%H%M%S")))
    parser.add_argument("--write", help="Append the table to this markdown file.")
    args = parser.parse_args()
    out = Path(args.out)
    seconds = train(out, args.iters)
    tokens = [e for e in runs.read_events(out) if e["event"] == "train"][-1]["trained_tokens"]
    base, tuned = evaluate(None), evaluate(out / "adapters")
    machine = f"{platform.machine()} {platform.system()}, {subprocess.getoutput('nproc')} cores"
    table = "\n".join([
        f"### Demo task (`bench/demo_accuracy.py --iters {args.iters}`), {time.strftime('%Y-%m-%d')}, {machine}",
        "",
        f"Training with the demo defaults: {seconds:.0f} s wall ({args.iters} steps, {tokens} trained tokens).",
        "",
        "| model | exact match (test) | test loss | perplexity |",
        "|---|---:|---:|---:|",
        f"| base SmolLM2-135M-Instruct | {base['correct']}/{base['total']} ({base['accuracy']:.0%}) | "
        f"{base['test_loss']:.3f} | {base['perplexity']:.2f} |",
        f"| + LoRA adapter | {tuned['correct']}/{tuned['total']} ({tuned['accuracy']:.0%}) | "
        f"{tuned['test_loss']:.3f} | {tuned['perplexity']:.2f} |",
        "",
    ])
    print(table)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
