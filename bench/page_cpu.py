"""What an open page of the app costs in CPU, without training: chromium's and the app server's ms per second.

    .venv/bin/python bench/page_cpu.py [--seconds 10] [--rounds 1] [--total-steps 200] [--report-every 1]

A quick companion to `ui_overhead.py --browser` (which trains for real and takes minutes): the app serves a
folder of fake runs, and for each round a fresh page in Debian's chromium (headless, Playwright) shows
  no run   nothing to show (the Train tab open);
  live     a run whose "training process" (a sleep) writes a train report every --report-every seconds (1: as a
           tiny CPU run would; 30: as the demo model does, so the measured seconds see no report): its
           progress bar moves by 10 steps of --total-steps each time (with the default 200, 5% a report);
  ended    the same run once it is done.
It prints each state's CPU per second and the delay from each report to its point drawn in the loss plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from test_ui_client import running_app  # noqa: E402
from ui_overhead import WATCH_PLOT, app_pid, chromium, cpu_seconds, helper_cpu, used  # noqa: E402

from lora_app import runs  # noqa: E402


def measure(runs_dir: Path, seconds: float) -> tuple[float, float]:
    """(chromium, app server) CPU in ms per second over the next `seconds`."""
    server = app_pid(runs_dir)
    before, served, start = helper_cpu(), cpu_seconds(server), time.time()
    time.sleep(seconds)
    after, wall = helper_cpu(), time.time() - start
    return used(before, after, "chromium") / wall * 1000, (cpu_seconds(server) - served) / wall * 1000


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="4 · Train").click()
    return page


def live_run(run_dir: Path, total: int, every: float, stop: threading.Event, earlier: int = 0) -> subprocess.Popen:
    """A running run folder with `earlier` train reports already, then one every `every` s until `stop`; returns
    its stand-in process (a sleep)."""
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"iters": total, "learning_rate": 1e-4}))
    alive = subprocess.Popen(["sleep", "3600"])
    (run_dir / "train.pid").write_text(str(alive.pid))
    runs.append_event(run_dir, "status", status="starting", total_steps=total)
    runs.append_event(run_dir, "first_step", tokens=1000, seconds=2.0)
    runs.append_event(run_dir, "status", status="running", total_steps=total)

    def loss_at(step: int) -> float:
        return 3 / (1 + step / 100)

    def train_event(step: int) -> None:
        runs.append_event(run_dir, "train", step=step, loss=loss_at(step), learning_rate=1e-4,
                          tokens_per_second=5000.0, trained_tokens=1000 * step, peak_memory_gb=0.1)

    for step in range(10, 10 * earlier + 1, 10):
        train_event(step)

    def report() -> None:
        step = 10 * earlier
        while not stop.wait(every):
            step += 10
            train_event(step)
            with open(run_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(f"step {step} loss {loss_at(step):.4f}\n")

    threading.Thread(target=report, daemon=True).start()
    return alive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="measured seconds per state")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--total-steps", type=int, default=200, help="the live run's length (its bar's pace)")
    ap.add_argument("--report-every", type=float, default=1.0, help="seconds between the live run's reports")
    ap.add_argument("--points", type=int, default=0, help="train reports the live run has already (its plot's size)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="page_cpu-"))
    runs_dir = tmp / "runs"
    runs_dir.mkdir()
    results: dict[str, list[tuple[float, float]]] = {"no run": [], "live": [], "ended": []}
    delays: list[float] = []
    with running_app(runs_dir, runs.engine_env()) as url, chromium() as browser:
        for r in range(a.rounds):
            for old in runs_dir.iterdir():  # a fresh page shows the newest run: none for "no run"
                old.rename(tmp / f"old-{r}-{old.name}")
            page = open_page(browser, url)
            time.sleep(3)
            results["no run"].append(measure(runs_dir, a.seconds))
            page.close()

            run_dir, stop = runs_dir / f"live{r}", threading.Event()
            alive = live_run(run_dir, a.total_steps, a.report_every, stop, a.points)
            page = open_page(browser, url)
            page.locator("#progress").get_by_text("running").wait_for(timeout=30_000)
            page.evaluate(WATCH_PLOT)
            watched = time.time()
            time.sleep(3)
            results["live"].append(measure(runs_dir, a.seconds))
            stop.set()
            time.sleep(2)
            seen = {int(k): v for k, v in page.evaluate("window.seenAt").items()}
            delays += [seen[e["step"]] - e["time"] for e in runs.read_events(run_dir)
                       if e["event"] == "train" and e["step"] in seen and e["time"] > watched]
            runs.append_event(run_dir, "status", status="done", total_steps=a.total_steps)
            alive.kill()
            alive.wait()
            page.locator("#progress").get_by_text("done").wait_for(timeout=30_000)
            time.sleep(2)
            results["ended"].append(measure(runs_dir, a.seconds))
            page.close()
            print(f"round {r}: " + ", ".join(f"{k}: chromium {v[-1][0]:.0f} ms/s, server {v[-1][1]:.0f} ms/s"
                                              for k, v in results.items()), flush=True)
    if delays:
        print(f"plot delay: mean {sum(delays) / len(delays):.2f} s, max {max(delays):.2f} s over {len(delays)}")


if __name__ == "__main__":
    main()
