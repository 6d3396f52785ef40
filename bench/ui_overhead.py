"""UI overhead (issue 8, part 3): the same run started from the real app and from the CLI, alternating.

    .venv/bin/python bench/ui_overhead.py [--repeats 3] [--iters 150] [--write bench/RESULTS.md]

The app side is the real thing: `python app.py` in a subprocess, the run started through its /start endpoint
(gradio_client) and the live view fetched through /poll once a second, as the page's gr.Timer does. Each poll's
answer is read for the loss plot's points, so the time from a train event's time stamp to the first poll that
returns its point is the plot-update delay. Tokens/s counts the tokens that carry loss after step 1 (step 1
includes loading and compiling), from events.jsonl on both sides. Runs alternate CLI, app, CLI, app, ... so a
drift in the machine's load hits both sides alike; the table gives every run and the medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lora_app import runs  # noqa: E402
from lora_app.config import save_config_json  # noqa: E402
from lora_app.ui.settings import FORM_KEYS, form_to_config  # noqa: E402


def steady_tokens_per_second(run_dir: Path) -> float:
    events = runs.read_events(run_dir)
    first = next(e for e in events if e["event"] == "first_step")
    last = [e for e in events if e["event"] == "train"][-1]
    return (last["trained_tokens"] - first["tokens"]) / (last["time"] - first["time"])


def run_cli(values: list, run_dir: Path, env: dict) -> float:
    config = form_to_config(dict(zip(FORM_KEYS, values)))
    run_dir.mkdir(parents=True)
    save_config_json(config, run_dir / "config.json")
    with open(run_dir / "train.log", "wb") as log:
        subprocess.run([sys.executable, "-m", "lora_app", "train", "--config", str(run_dir / "config.json"),
                        "--out", str(run_dir)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    return steady_tokens_per_second(run_dir)


def app_pid(runs_dir: Path) -> int:
    """The app server's process id (its command line names our runs folder)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"app.py" in cmdline and str(runs_dir).encode() in cmdline:
            return int(proc.name)
    raise RuntimeError("the app server's process was not found")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_app(client, values: list, runs_dir: Path, name: str, cpu: dict) -> tuple[float, list[float]]:
    """Start from the app, poll like the page until the run ends; (tokens/s, plot delays in s). Adds the CPU
    seconds the app server and this poller used, and the wall time, to `cpu`."""
    from test_ui_client import plot_points

    server, wall, mine = app_pid(runs_dir), time.time(), time.process_time()
    served = cpu_seconds(server)
    client.predict(name, *values, api_name="/start")
    run_dir = runs_dir / name
    seen_at: dict[int, float] = {}  # step -> when a poll first returned its train point
    while True:
        out = client.predict(api_name="/poll")
        now = time.time()
        for step, _loss, series in plot_points(out):
            if series == "train":
                seen_at.setdefault(int(step), now)
        state = runs.run_state(run_dir)
        if state.status in runs.TERMINAL | {"interrupted"} and not state.alive:
            break
        time.sleep(max(0.0, 1.0 - (time.time() - now)))
    cpu["server"] = cpu.get("server", 0.0) + cpu_seconds(server) - served
    cpu["poller"] = cpu.get("poller", 0.0) + time.process_time() - mine
    cpu["wall"] = cpu.get("wall", 0.0) + time.time() - wall
    assert state.status == "done", f"{name}: {state.status}, see {run_dir / 'train.log'}"
    # the last poll happens after the end: every point has been seen by then
    delays = [seen_at[e["step"]] - e["time"] for e in runs.read_events(run_dir)
              if e["event"] == "train" and e["step"] in seen_at]
    return steady_tokens_per_second(run_dir), delays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "ui_overhead"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--write", help="Append the table to this markdown file.")
    args = ap.parse_args()

    from gradio_client import Client
    from test_ui_client import form, running_app
    from tiny import build_text_data, build_tiny_model

    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    model = build_tiny_model(out / "model", layers=args.layers, hidden=args.hidden, vocab_size=512)
    data = build_text_data(out / "data", n_train=512, n_valid=16)
    values = form(model=str(model), data=str(data), iters=args.iters, batch_size=8, steps_per_report=10,
                  steps_per_eval=0, save_every=args.iters, learning_rate=1e-3)
    env = runs.engine_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    cli_rates, app_rates, delays, cpu = [], [], [], {}
    runs_dir = out / "app-runs"
    with running_app(runs_dir, env) as url:
        client = Client(url, verbose=False)
        for i in range(args.repeats):
            cli_rates.append(run_cli(values, out / "cli" / f"run{i}", env))
            rate, d = run_app(client, values, runs_dir, f"run{i}", cpu)
            app_rates.append(rate)
            delays += d
            print(f"repeat {i}: CLI {cli_rates[-1]:,.0f} tok/s, app {rate:,.0f} tok/s, "
                  f"plot delay max {max(d):.2f} s", flush=True)

    cli_med, app_med = statistics.median(cli_rates), statistics.median(app_rates)
    paired = statistics.median((a / c - 1) * 100 for c, a in zip(cli_rates, app_rates))
    text = (f"\n### UI overhead (`bench/ui_overhead.py`) — {time.strftime('%Y-%m-%d')}, {platform.machine()} "
            f"{platform.system()}, {os.cpu_count()} CPU cores\n\n"
            f"Command: `.venv/bin/python bench/ui_overhead.py {' '.join(sys.argv[1:])}`  \n"
            f"Tiny llama ({args.layers} layers, hidden {args.hidden}), batch 8, {args.iters} steps, packed text "
            f"rows; the app polled once a second like the page.\n\n"
            "| run | CLI tokens/s | app tokens/s |\n|---|---:|---:|\n"
            + "".join(f"| {i} | {c:,.0f} | {a:,.0f} |\n" for i, (c, a) in enumerate(zip(cli_rates, app_rates)))
            + f"| **median** | **{cli_med:,.0f}** | **{app_med:,.0f}** ({(app_med / cli_med - 1) * 100:+.1f}%) |\n\n"
            f"App vs the CLI run just before it: median {paired:+.1f}% (each pair: "
            f"{', '.join(f'{(a / c - 1) * 100:+.1f}%' for c, a in zip(cli_rates, app_rates))}).\n"
            f"\nPlot update after the train report: mean {statistics.mean(delays):.2f} s, "
            f"max {max(delays):.2f} s over {len(delays)} reports. CPU used while the app's runs trained: the app "
            f"server {cpu['server'] / cpu['wall'] * 1000:.0f} ms per second, the poller (gradio_client, standing in "
            f"for the browser) {cpu['poller'] / cpu['wall'] * 1000:.0f} ms per second, of the "
            f"{os.cpu_count() * 1000} ms per second this machine has.\n")
    print(text)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
