"""Our engine (`python -m lora_app train`) vs the unmodified `mlx_lm.lora` CLI, side by side on this machine.

    .venv/bin/python bench/compare_cli.py [--layers 4 --hidden 256 ...] [--out bench/out] [--write FILE.md]

Builds a tiny-but-not-trivial llama (tests/tiny.py, random weights) and three datasets: uniform-length text rows,
mixed-length chat rows (10-1000 tokens) and short chat rows (16-160 tokens). Each dataset is trained for exactly
one epoch by
- mlx-lm: `python -m mlx_lm lora --train --config <yaml>` (same model, data, rank, scale, keys, layers, batch size,
  learning rate, schedule, max_seq_length),
- ours, padded batches: the same rows per step, the same number of steps, so the same tokens,
- ours, packed rows: the same tokens (one epoch), in fewer steps because short rows share a row.
Both processes get OpenBLAS preloaded (runs.engine_env()). Tokens count only those that carry loss (mlx-lm also
trains on one padding token after each row; that token is not counted for it). Throughput is the wall-clock
rate after the first step: trained tokens after step 1 / (last train report - end of step 1), for both sides
taken from the time each report line appears (mlx-lm's stdout) or is written (our events.jsonl). The speed-up
is mlx-lm's whole wall time (start to adapter) over ours. `--repeat N` runs the sides of each dataset in turn N
times and reports each side's median run (by wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lora_app import runs  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPORT = re.compile(r"^\s*(\d+)\s+([0-9.]+|nan|inf)\s+\S\s+([0-9,]+)\s+([0-9.]+)k\s*$")


# ---- data --------------------------------------------------------------------------------------------------

def words(rng: random.Random, n: int) -> str:
    from tiny import sentences

    out: list[str] = []
    while len(out) < n:
        out += sentences(1, seed=rng.randrange(1 << 30))[0].split()
    return " ".join(out[:n])


def build_data(out: Path, tokenizer, args) -> dict[str, Path]:
    """uniform/: text rows of ~uniform_len tokens; mixed/: chat rows with lengths spread over min_len-max_len."""
    rng = random.Random(0)
    made = {}
    # uniform text: grow each row to exactly uniform_len tokens (EOS included)
    folder = out / "uniform"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(args.uniform_rows + args.batch_size):
        text = words(rng, args.uniform_len)
        ids = tokenizer.encode(text)[: args.uniform_len - 1]
        rows.append({"text": tokenizer.decode(ids).strip()})
    write(folder, rows[: args.uniform_rows], rows[args.uniform_rows:])
    made["uniform"] = folder
    made["mixed"] = chat_rows(out / "mixed", rng, args.mixed_rows, args.min_len, args.max_len, args.batch_size)
    made["short"] = chat_rows(out / "short", rng, args.short_rows, args.short_min, args.short_max, args.batch_size)
    return made


def chat_rows(folder: Path, rng: random.Random, n: int, min_len: int, max_len: int, n_valid: int) -> Path:
    """One-turn chat rows whose lengths (template included) spread evenly over [min_len, max_len]."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n):
        body = max(rng.randint(min_len, max_len) - 10, 2)  # the template adds ~10 tokens for two turns
        k = rng.randint(1, body - 1)
        rows.append({"messages": [{"role": "user", "content": words(rng, k)},
                                  {"role": "assistant", "content": words(rng, body - k)}]})
    valid = [{"messages": [{"role": "user", "content": words(rng, 6)},
                           {"role": "assistant", "content": words(rng, 6)}]} for _ in range(n_valid)]
    write(folder, rows, valid)
    return folder


def write(folder: Path, train: list[dict], valid: list[dict]) -> None:
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))


def plan_stats(model: Path, data: Path, args) -> dict:
    """Token lengths and steps per epoch for padded and packed batching (what our trainer will do)."""
    from transformers import AutoTokenizer

    from lora_app.batching import BatchPlan
    from lora_app.config import DataConfig
    from lora_app.data import load_data

    tok = AutoTokenizer.from_pretrained(str(model))
    loaded = load_data(DataConfig(data=str(data)), tok, batch_size=args.batch_size)
    lengths = [len(t) for t, _ in loaded.train]
    stats = {"rows": len(lengths), "min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}
    for mode in ("padded", "packed"):
        plan = BatchPlan(loaded.train, args.batch_size, args.max_seq_length, mode, seed=0)
        batches = [plan.batch_at(s) for s in range(plan.steps_per_epoch())]
        stats[mode] = {"steps": len(batches), "tokens": sum(b.trained_tokens for b in batches),
                       "shapes": len({b.tokens.shape for b in batches}),
                       "masked_steps": sum(b.segments is not None for b in batches)}
    return stats


# ---- running both sides ------------------------------------------------------------------------------------

def run_timed(cmd: list[str], log: Path, env: dict) -> dict:
    """Run a process; time-stamp each stdout line as it arrives; peak RSS from wait4."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            text=True, bufsize=1)
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append((time.time(), ANSI.sub("", line.rstrip("\n"))))

    reader = threading.Thread(target=pump)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    end = time.time()
    log.write_text("".join(f"{t - start:9.3f} {text}\n" for t, text in lines))
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}); see {log}")
    return {"start": start, "end": end, "lines": lines, "max_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def run_mlx_lm(model: Path, data: Path, work: Path, iters: int, args, env: dict) -> dict:
    import yaml

    cfg = {
        "model": str(model), "train": True, "fine_tune_type": "lora", "data": str(data),
        "batch_size": args.batch_size, "iters": iters, "learning_rate": args.learning_rate,
        "lr_schedule": {"name": "cosine_decay", "arguments": [args.learning_rate, iters, 0.0]},
        "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "num_layers": -1, "max_seq_length": args.max_seq_length, "seed": 0,
        "lora_parameters": {"rank": args.rank, "scale": args.alpha / args.rank, "dropout": 0.0,
                            "keys": [f"self_attn.{m}" if m[0] in "qkvo" else f"mlp.{m}" for m in args.modules]},
        # steps_per_report 1 gives a time stamp per step (mlx-lm syncs every step anyway, so it costs a print);
        # validation is one batch of short rows, saving only at the end
        "steps_per_report": 1, "steps_per_eval": iters, "val_batches": 1, "save_every": iters,
        "adapter_path": str(work / "adapters"), "grad_checkpoint": False,
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_timed([sys.executable, "-m", "mlx_lm", "lora", "--config", str(work / "config.yaml")],
                  work / "stdout.log", env)
    reports = []  # (time, step, loss, reported tok/s, cumulative tokens incl. mlx-lm's pad token)
    for t, line in r["lines"]:
        m = REPORT.match(line)
        if m:
            reports.append((t, int(m[1]), float(m[2]), float(m[3].replace(",", "")), float(m[4]) * 1000))
    if len(reports) != iters:
        raise SystemExit(f"mlx-lm: parsed {len(reports)} report lines, expected {iters}; see {work}/stdout.log")
    pad = args.batch_size  # mlx-lm's mask includes one padding token after each row
    total = reports[-1][4] - pad * iters
    first_tokens = reports[0][4] - pad
    return {
        "first_step_s": reports[0][0] - r["start"], "wall_s": r["end"] - r["start"],
        "tokens": total, "steps": iters,
        "tok_s": (total - first_tokens) / (reports[-1][0] - reports[0][0]),
        "own_tok_s": sum(x[3] for x in reports[1:]) / (len(reports) - 1),
        "max_rss_gb": r["max_rss_gb"], "mlx_peak_gb": None,
        "curve": [(x[4] - pad * x[1], x[2]) for x in reports],
    }


def run_ours(model: Path, data: Path, work: Path, iters: int, mode: str, args, env: dict,
             via_app: bool = False) -> dict:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    flags = ["--model", str(model), "--data", str(data), "--batch-size", str(args.batch_size),
             "--iters", str(iters), "--learning-rate", str(args.learning_rate), "--lr-schedule", "cosine",
             "--optimizer", "adamw", "--rank", str(args.rank), "--alpha", str(args.alpha),
             "--modules", ",".join(args.modules), "--layers", "all", "--max-seq-length", str(args.max_seq_length),
             "--seed", "0", "--batching", mode, "--steps-per-report", "10", "--steps-per-eval", str(iters),
             "--val-batches", "1", "--save-every", str(iters)]
    if via_app:
        return run_via_app(work, flags)
    r = run_timed([sys.executable, "-m", "lora_app", "train", *flags, "--out", str(work)], work.parent /
                  f"{work.name}.log", env)
    return summarize_events(work, r["start"], r["end"], r["max_rss_gb"])


def summarize_events(work: Path, start: float, end: float, max_rss_gb: float | None) -> dict:
    events = runs.read_events(work)
    first = next(e for e in events if e["event"] == "first_step")
    train = [e for e in events if e["event"] == "train"]
    info = next(e for e in events if e["event"] == "info" and "steps_per_epoch" in e)
    first_end = first["time"]  # wall clock, like mlx-lm's line arrival: both measured from the spawn
    first_tokens = first.get("tokens")
    total = train[-1]["trained_tokens"]
    if first_tokens is None:  # older events: estimate step 1 as an average step
        first_tokens = total / train[-1]["step"]
    return {
        "first_step_s": first_end - start, "wall_s": end - start, "tokens": total, "steps": train[-1]["step"],
        "tok_s": (total - first_tokens) / (train[-1]["time"] - first_end),
        "own_tok_s": sum(e["tokens_per_second"] for e in train) / len(train),
        "max_rss_gb": max_rss_gb, "mlx_peak_gb": max(e["peak_memory_gb"] for e in train),
        "curve": [(e["trained_tokens"], e["loss"]) for e in train], "steps_per_epoch": info["steps_per_epoch"],
        "train_events": train,
    }


# ---- UI overhead: the app's path (start_training + a poller) -----------------------------------------------

def run_via_app(work: Path, flags: list[str]) -> dict:
    """Start training as the UI does (runs.start_training on a run folder) and poll events every 0.5 s."""
    from lora_app.__main__ import build_parser, run_config_from_args
    from lora_app.config import save_config_json

    args = build_parser().parse_args(["train", *flags, "--out", str(work)])
    cfg = run_config_from_args(args)
    work.mkdir(parents=True)
    save_config_json(cfg, work / "config.json")
    reader = runs.EventReader(work)
    start = time.time()
    proc = runs.start_training(work)
    delays = []
    while True:
        done = proc.poll() is not None
        seen = time.time()
        for e in reader.read_new():
            if e["event"] == "train":
                delays.append(seen - e["time"])
        if done:
            break
        time.sleep(0.5)
    end = time.time()
    out = summarize_events(work, start, end, None)
    out["poll_delay_max_s"] = max(delays)
    out["poll_delay_mean_s"] = sum(delays) / len(delays)
    return out


# ---- report ------------------------------------------------------------------------------------------------

def fmt_gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(results: dict, stats: dict) -> str:
    lines = ["| data | side | steps | trained tokens | tokens/s (after step 1) | ratio ours/mlx-lm | "
             "time to first step (s) | total wall (s) | speed-up (wall) | walls of the runs (s) | peak RSS (GB) | "
             "MLX peak (GB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, sides in results.items():
        base = sides["mlx-lm"]
        for side, r in sides.items():
            ratio = "1.00" if side == "mlx-lm" else f"{r['tok_s'] / base['tok_s']:.2f}×"
            speedup = "1.00" if side == "mlx-lm" else f"**{base['wall_s'] / r['wall_s']:.2f}×**"
            walls = ", ".join(f"{w:.1f}" for w in r.get("walls", [r["wall_s"]]))
            lines.append(f"| {name} | {side} | {r['steps']} | {r['tokens']:,.0f} | {r['tok_s']:,.0f} | {ratio} | "
                         f"{r['first_step_s']:.2f} | {r['wall_s']:.1f} | {speedup} | {walls} | "
                         f"{fmt_gb(r['max_rss_gb'])} | {fmt_gb(r['mlx_peak_gb'])} |")
    lines.append("")
    for name, s in stats.items():
        lines.append(f"- {name}: {s['rows']} rows, tokens per row {s['min']}–{s['max']} (mean {s['mean']:.0f}); "
                     f"padded: {s['padded']['steps']} steps, {s['padded']['shapes']} distinct shapes; "
                     f"packed: {s['packed']['steps']} steps, {s['packed']['shapes']} shapes, "
                     f"{s['packed']['masked_steps']} steps with a segment mask")
    return "\n".join(lines)


def curve_table(results: dict, points: int = 6) -> str:
    """Loss against trained tokens: each side's mean loss over equal slices of the epoch."""
    out = []
    for name, sides in results.items():
        total = max(r["tokens"] for r in sides.values())
        edges = [total * (i + 1) / points for i in range(points)]
        head = " | ".join(f"≤{e / 1000:.0f}k" for e in edges)
        out += [f"\n{name}: mean train loss by trained tokens", f"| side | {head} |",
                "|---|" + "---:|" * points]
        for side, r in sides.items():
            cells = []
            lo = 0.0
            for e in edges:
                vals = [loss for tok, loss in r["curve"] if lo < tok <= e * 1.0001]
                cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
                lo = e * 1.0001
            out.append(f"| {side} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--modules", default="q_proj,v_proj")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--uniform-rows", type=int, default=256)
    ap.add_argument("--uniform-len", type=int, default=256)
    ap.add_argument("--mixed-rows", type=int, default=160)
    ap.add_argument("--min-len", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=1000)
    ap.add_argument("--short-rows", type=int, default=320)
    ap.add_argument("--short-min", type=int, default=16)
    ap.add_argument("--short-max", type=int, default=160)
    ap.add_argument("--datasets", default="uniform,mixed,short")
    ap.add_argument("--modes", default="padded,packed", help="our batching modes to run")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every side; the table shows each side's median")
    ap.add_argument("--app", action="store_true", help="Also run ours through runs.start_training + a poller.")
    ap.add_argument("--write", help="Append the tables to this markdown file.")
    args = ap.parse_args()
    args.modules = args.modules.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = runs.engine_env()

    from tiny import build_tiny_model
    from transformers import AutoTokenizer

    model = out / "model"
    build_tiny_model(model, layers=args.layers, hidden=args.hidden, vocab_size=args.vocab)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    folders = build_data(out, tokenizer, args)
    results, stats = {}, {}
    for name in args.datasets.split(","):
        data = folders[name]
        stats[name] = s = plan_stats(model, data, args)
        runs_of: dict[str, list[dict]] = {}
        for _ in range(args.repeat):  # the sides in turn, so a slow spell of a shared machine hits each alike
            runs_of.setdefault("mlx-lm", []).append(
                run_mlx_lm(model, data, out / f"{name}-mlx_lm", s["padded"]["steps"], args, env))
            for mode in args.modes.split(","):
                runs_of.setdefault(f"ours {mode}", []).append(
                    run_ours(model, data, out / f"{name}-ours-{mode}", s[mode]["steps"], mode, args, env))
            print(f"{name}: " + ", ".join(f"{side} {r[-1]['wall_s']:.1f} s" for side, r in runs_of.items()),
                  flush=True)
        sides = {side: median_run(r) for side, r in runs_of.items()}
        if args.app:
            sides["ours packed, via app + poller"] = run_ours(model, data, out / f"{name}-app", s["packed"]["steps"],
                                                              "packed", args, env, via_app=True)
        results[name] = sides
    import platform

    head = (f"\n### CLI comparison — {time.strftime('%Y-%m-%d')}, {platform.node()} "
            f"({os.cpu_count()} CPU cores, MLX {mx_version()} CPU + OpenBLAS)\n\n"
            f"Command: `.venv/bin/python bench/compare_cli.py {' '.join(sys.argv[1:])}`  \n"
            f"Model: tiny llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; LoRA rank "
            f"{args.rank}, alpha {args.alpha:g} on {', '.join(args.modules)} of all blocks; batch {args.batch_size}; "
            f"lr {args.learning_rate:g} cosine; max_seq_length {args.max_seq_length}; one epoch per run (padded "
            f"sides: same steps and tokens as mlx-lm; packed: same tokens in fewer steps).\n\n")
    text = head + table(results, stats) + "\n" + curve_table(results)
    for name, sides in results.items():
        app = sides.get("ours packed, via app + poller")
        if app:
            cli = sides["ours packed"]
            text += (f"\n\nUI path ({name}): via app {app['tok_s']:,.0f} tok/s vs CLI {cli['tok_s']:,.0f} "
                     f"({(app['tok_s'] / cli['tok_s'] - 1) * 100:+.1f}%); poller (0.5 s) saw train events "
                     f"{app['poll_delay_mean_s']:.2f} s after their time stamp on average, "
                     f"{app['poll_delay_max_s']:.2f} s at most")
    print(text)
    (out / "results.json").write_text(json.dumps({k: {s: {kk: vv for kk, vv in r.items() if kk != "train_events"}
                                                        for s, r in v.items()} for k, v in results.items()},
                                                 indent=1))
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def median_run(runs_of_side: list[dict]) -> dict:
    """The run with the median wall time (the lower middle one of an even count), with every run's wall."""
    ordered = sorted(runs_of_side, key=lambda r: r["wall_s"])
    return dict(ordered[(len(ordered) - 1) // 2], walls=[r["wall_s"] for r in runs_of_side])


def mx_version() -> str:
    import mlx.core as mx

    return mx.__version__


if __name__ == "__main__":
    main()
