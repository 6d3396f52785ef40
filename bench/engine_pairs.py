"""Two versions of the engine through the CLI on one machine, alternating run by run (issue 8).

    python3 bench/engine_pairs.py --engines new=.,old=/path/to/old/checkout --data uniform,mixed --rounds 3
    python3 bench/engine_pairs.py --engines "bound=.,free=.+--memory-limit-gb=100" --data uniform

An engine is name=folder, optionally followed by +-separated extra CLI arguments for its runs; an extra that
looks like NAME=value (capitals, no leading dash) is set in the run's environment instead, e.g.
    --engines "free=.+--memory-limit-gb=100,free5=.+--memory-limit-gb=100+MLX_MAX_OPS_PER_BUFFER=5"

On the H200 the same run drifts between a fast and a slow regime for seconds at a time (bench/RESULTS.md), so
two engines measured in separate calls cannot be told apart by 5-10%. Here each round runs every engine on every
dataset, one `python -m lora_app train` after another (the app's path), with the folder of each engine as the
working directory, so `-m lora_app` imports that engine. Data and model are gpu_memory.py --prep's (0.5B Qwen2
shape, random bf16 weights; rank 8 / alpha 16 on q/v, batch 8, lr 1e-5, packed rows of up to 1024). Steady
tokens/s = trained tokens after step 1 / time from step 1 to the last report; peak = the train events' maximum.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_bench import steady_tokens_per_second  # noqa: E402

from lora_app.runs import read_events  # noqa: E402

# An extra of an engine that sets an environment variable for its runs (NAME=value) rather than a CLI argument.
ENV_SETTING = re.compile(r"^[A-Z][A-Z0-9_]*=")


def run(engine: Path, extra: list[str], data: str, a, out: Path) -> dict:
    run_dir = out / f"{engine.name or 'engine'}-{data}-{time.time_ns()}"
    settings = dict(x.split("=", 1) for x in extra if ENV_SETTING.match(x))
    extra = [x for x in extra if not ENV_SETTING.match(x)]
    cmd = [sys.executable, "-m", "lora_app", "train", "--model", f"{a.work}/model", "--data", f"{a.work}/{data}",
           "--batch-size", "8", "--iters", str(a.iters[data]), "--rank", "8", "--alpha", "16",
           "--learning-rate", "1e-5", "--max-seq-length", "1024", "--batching", "packed",
           "--steps-per-report", "10", "--steps-per-eval", "0", "--save-every", str(a.iters[data]),
           "--out", str(run_dir), *extra]
    env = {**os.environ, **settings,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(engine), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, cwd=engine, env=env, check=True, timeout=a.timeout, stdout=subprocess.DEVNULL)
    events = read_events(run_dir)
    train = [e for e in events if e["event"] == "train"]
    return {"tok_s": steady_tokens_per_second(events), "peak_gb": max(e["peak_memory_gb"] for e in train),
            "loss": train[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", required=True, help="name=folder,name=folder (each folder holds lora_app/)")
    ap.add_argument("--data", default="uniform,mixed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--uniform-iters", type=int, default=100)
    ap.add_argument("--mixed-iters", type=int, default=60)
    ap.add_argument("--work", default="/tmp/gpu_bench")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per run")
    a = ap.parse_args()
    a.iters = {"uniform": a.uniform_iters, "mixed": a.mixed_iters}
    engines = {}
    for spec in a.engines.split(","):
        name, rest = spec.split("=", 1)
        folder, *extra = rest.split("+")
        engines[name] = (Path(folder).resolve(), extra)
    out = Path(a.work) / "engine_pairs"
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.rounds):
        for data in a.data.split(","):
            for name, (folder, extra) in engines.items():
                res = run(folder, extra, data, a, out)
                results.setdefault((name, data), []).append(res)
                print(f"round {r + 1} {data} {name}: {res['tok_s']:,.0f} tokens/s, peak {res['peak_gb']:.2f} GB, "
                      f"last loss {res['loss']:.4f}", flush=True)
    print("\n| engine | data | tokens/s, each round | median | peak GB |\n|---|---|---|---:|---:|")
    for (name, data), rs in results.items():
        each = ", ".join(f"{x['tok_s'] / 1e3:.1f}k" for x in rs)
        print(f"| {name} | {data} | {each} | {statistics.median(x['tok_s'] for x in rs):,.0f} | "
              f"{max(x['peak_gb'] for x in rs):.2f} |")


if __name__ == "__main__":
    main()
