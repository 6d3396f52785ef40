"""UI overhead, whole runs: the same run started from the real app and from the CLI, alternating.

    .venv/bin/python bench/ui_overhead.py [--repeats 3] [--iters 150] [--browser] [--write FILE.md]
    python3 bench/ui_overhead.py --model bench/out/gpu/model --data bench/out/gpu/uniform --rank 8 --alpha 16 \
        --learning-rate 1e-5 --max-seq-length 1024        # on a GPU machine, after gpu_bench.py --part prep

The app side is the real thing: `python app.py` in a subprocess, the run started through its /start endpoint
(gradio_client) and the live view followed through /follow, the stream of updates the page gets. Each update is
read for the loss plot's points, so the time from a train event's time stamp to the first update that brings its
point is the plot-update delay. Tokens/s counts the tokens that carry loss after step 1 (step 1
includes loading and compiling), from events.jsonl on both sides. Runs alternate CLI, app, CLI, app, ... so a
drift in the machine's load hits both sides alike; the table gives every run and the medians.

With --browser the page itself drives the app, in Debian's chromium (headless, through Playwright): for each app
run a fresh page (the finished app runs moved aside, so it attaches to none) imports the settings as YAML, clicks
Start, and follows the run. A MutationObserver in the page notes when each train point is drawn in the loss
plot (the plot-update delay), and the CPU of all chromium processes is counted, also for a few seconds with the page
open and idle before Start. No page is open while the CLI runs, so the CLI side stays a run without a UI.
"""

from __future__ import annotations

import argparse
import contextlib
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
from lora_app.ui.settings import FORM_KEYS, export_yaml, form_to_config  # noqa: E402

IDLE_S = 5  # the page open and idle before Start, to measure what an open page costs by itself
# In the page: window.seenAt[step] = when the loss plot first drew that train point (the SVG's train path lists its
# points as "x,y,step,loss ...": lora_app/ui/loss_plot.py).
WATCH_PLOT = """() => {
  window.seenAt = {};
  new MutationObserver(() => {
    const now = Date.now() / 1000;
    for (const path of document.querySelectorAll('#loss-plot [data-series="train"]')) {
      for (const point of path.dataset.points.split(" ")) window.seenAt[point.split(",")[2]] ??= now;
    }
  }).observe(document.getElementById("loss-plot"), {subtree: true, childList: true, attributes: true,
                                                     attributeFilter: ["data-points"]});  // the plot only: cheap
}"""


def steady_tokens_per_second(run_dir: Path) -> float:
    events = runs.read_events(run_dir)
    first = next(e for e in events if e["event"] == "first_step")
    last = [e for e in events if e["event"] == "train"][-1]
    return (last["trained_tokens"] - first["tokens"]) / (last["time"] - first["time"])


def write_run_config(values: list, run_dir: Path) -> None:
    """A new run folder holding the app form's settings as config.json."""
    run_dir.mkdir(parents=True)
    save_config_json(form_to_config(dict(zip(FORM_KEYS, values))), run_dir / "config.json")


def run_cli(values: list, run_dir: Path, env: dict) -> float:
    write_run_config(values, run_dir)
    with open(run_dir / "train.log", "wb") as log:
        subprocess.run([sys.executable, "-m", "lora_app", "train", "--config", str(run_dir / "config.json"),
                        "--out", str(run_dir)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    return steady_tokens_per_second(run_dir)


def run_spawned(values: list, run_dir: Path) -> float:
    """The CLI started the way the app starts it (runs.start_training: its own session, output to train.log), with
    no app involved: tells the spawn path's cost from the UI's."""
    write_run_config(values, run_dir)
    runs.start_training(run_dir).wait()
    return steady_tokens_per_second(run_dir)


def report_rates(run_dir: Path) -> str:
    return " ".join(f"{e['tokens_per_second'] / 1e3:.0f}k" for e in runs.read_events(run_dir) if e["event"] == "train")


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


def descendants(root: int) -> list[int]:
    """Process ids below `root`, through each process's parent id (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def helper_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (kind, CPU seconds so far)} for this script's chromium processes ("chromium": their binary lies in
    /usr/lib/chromium, which /usr/bin/chromium, a shell script, execs) and Playwright's driver ("driver": the node
    process that relays between this script and the browser)."""
    found = {}
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError, IndexError):
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            kind = "chromium" if exe.startswith("/usr/lib/chromium/") else "driver" if "playwright" in exe else ""
            if kind:
                found[pid] = (kind, cpu_seconds(pid))
    return found


def used(before: dict, after: dict, kind: str) -> float:
    """CPU seconds the `kind` processes used between two helper_cpu() calls (ones that ended are missed)."""
    return sum(cpu - before.get(pid, (kind, 0.0))[1] for pid, (k, cpu) in after.items() if k == kind)


def finished(run_dir: Path) -> runs.RunState | None:
    state = runs.run_state(run_dir)
    return state if state.status in runs.TERMINAL | {"interrupted"} and not state.alive else None


def outcome(run_dir: Path, state: runs.RunState, seen_at: dict[int, float]) -> tuple[float, list[float]]:
    """(tokens/s, plot delays in s: from each train report's time stamp to when its point was seen)."""
    assert state.status == "done", f"{run_dir.name}: {state.status}, see {run_dir / 'train.log'}"
    delays = [seen_at[e["step"]] - e["time"] for e in runs.read_events(run_dir)
              if e["event"] == "train" and e["step"] in seen_at]
    return steady_tokens_per_second(run_dir), delays


class Follower:
    """The app's /follow stream through gradio_client, as the page gets it (train_step.follow: an update when the
    run folder changes); notes when each train point first came back. `client` must be the one that started the
    run: the run shown is state of its session. Its updates are looked at on take() (gradio_client's own
    iterator waits in a 1 ms loop, CPU this script should not take)."""

    def __init__(self, client, seen_at: dict[int, float]):
        self.job, self.seen_at, self.read = client.submit(api_name="/follow"), seen_at, 0

    def take(self) -> None:
        from test_ui_client import plot_points

        outs, now = self.job.outputs(), time.time()
        for out in outs[self.read:]:
            for step, _, series in plot_points(out):
                if series == "train":
                    self.seen_at.setdefault(int(step), now)
        self.read = len(outs)

    def close(self) -> None:
        self.take()
        self.job.cancel()


def run_app(client, values: list, runs_dir: Path, name: str, cpu: dict) -> tuple[float, list[float]]:
    """Start from the app, follow it like the page until the run ends; (tokens/s, plot delays in s). Adds the CPU
    seconds the app server and this follower used, and the wall time, to `cpu`."""
    server, wall, mine = app_pid(runs_dir), time.time(), time.process_time()
    served = cpu_seconds(server)
    client.predict(name, *values, api_name="/start")
    run_dir = runs_dir / name
    seen_at: dict[int, float] = {}  # step -> when an update first brought its train point
    follower = Follower(client, seen_at)
    while not (state := finished(run_dir)):
        follower.take()
        time.sleep(0.25)
    time.sleep(2.0)  # the run's last update: up to FOLLOW_GAP_S + FOLLOW_CHECK_S after its end
    follower.close()
    cpu["server"] = cpu.get("server", 0.0) + cpu_seconds(server) - served
    cpu["follower"] = cpu.get("follower", 0.0) + time.process_time() - mine
    cpu["wall"] = cpu.get("wall", 0.0) + time.time() - wall
    return outcome(run_dir, state, seen_at)


@contextlib.contextmanager
def chromium():
    """Debian's chromium through Playwright, with the flags our browser tests use (no background traffic)."""
    from playwright.sync_api import sync_playwright
    from test_ui_browser import ARGS, CHROMIUM

    with sync_playwright() as p:
        yield p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)


def run_in_browser(browser, url: str, settings: Path, runs_dir: Path, name: str,
                   cpu: dict) -> tuple[float, list[float]]:
    """A fresh page imports the settings, idles IDLE_S seconds, then clicks Start and shows the run until it ends;
    (tokens/s, plot delays in s). Adds the CPU seconds of the app server, of chromium and of the harness (the
    Playwright driver and this script) and the wall time to `cpu`, and those of the idle page to "idle_*"."""
    from test_ui_client import wait_until

    done = runs_dir.parent / "app-runs-done"  # a fresh page shows the newest run: the finished ones move here,
    for old in runs_dir.glob("*/"):  # so that the plot starts empty and only ever draws this run's points
        done.mkdir(exist_ok=True)
        old.rename(done / old.name)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="4 · Train").click()
    page.get_by_text("Command line and YAML").click()
    page.locator(".block", has_text="Import an mlx_lm.lora YAML config").locator("input[type=file]") \
        .set_input_files(str(settings))
    toast = page.get_by_text("Imported the settings").first
    toast.wait_for(timeout=30_000)
    page.get_by_label("Run name (optional)").fill(name)
    toast.wait_for(state="hidden", timeout=60_000)  # its countdown animates: the idle page is measured without it

    server = app_pid(runs_dir)
    before, served, wall = helper_cpu(), cpu_seconds(server), time.time()
    time.sleep(IDLE_S)  # the page shows no run yet
    after = helper_cpu()
    cpu["idle_chromium"] = cpu.get("idle_chromium", 0.0) + used(before, after, "chromium")
    cpu["idle_server"] = cpu.get("idle_server", 0.0) + cpu_seconds(server) - served
    cpu["idle_wall"] = cpu.get("idle_wall", 0.0) + time.time() - wall

    before, served, mine, wall = helper_cpu(), cpu_seconds(server), time.process_time(), time.time()
    page.locator("#start").click()
    page.locator("#train-message").get_by_text("Started").wait_for(timeout=30_000)
    page.evaluate(WATCH_PLOT)
    run_dir = runs_dir / name
    state = wait_until(lambda: finished(run_dir), 3600, f"{name} to end")
    after = helper_cpu()
    cpu["server"] = cpu.get("server", 0.0) + cpu_seconds(server) - served
    cpu["chromium"] = cpu.get("chromium", 0.0) + used(before, after, "chromium")
    cpu["harness"] = cpu.get("harness", 0.0) + used(before, after, "driver") + time.process_time() - mine
    cpu["wall"] = cpu.get("wall", 0.0) + time.time() - wall

    # The last points are drawn by the update after the run's end: wait a while, then count.
    reports = sum(e["event"] == "train" for e in runs.read_events(run_dir))
    deadline = time.monotonic() + 5
    while page.evaluate("Object.keys(window.seenAt).length") < reports and time.monotonic() < deadline:
        time.sleep(0.2)
    seen_at = {int(step): t for step, t in page.evaluate("window.seenAt").items()}
    page.close()
    return outcome(run_dir, state, seen_at)


def rates_table(cli: list[float], spawned: list[float], app: list[float]) -> str:
    """Markdown: each run's tokens/s and the medians (app and spawned also as % of the CLI's median)."""
    cols = [("CLI", cli)] + ([("CLI started like the app", spawned)] if spawned else []) + [("app", app)]
    base = statistics.median(cli)

    def median(xs: list[float]) -> str:
        m = statistics.median(xs)
        return f"**{m:,.0f}**" + (f" ({(m / base - 1) * 100:+.1f}%)" if xs is not cli else "")

    return ("| run | " + " | ".join(f"{name} tokens/s" for name, _ in cols) + " |\n|---|" + "---:|" * len(cols)
            + "\n" + "".join(f"| {i} | " + " | ".join(f"{xs[i]:,.0f}" for _, xs in cols) + " |\n"
                             for i in range(len(cli)))
            + "| **median** | " + " | ".join(median(xs) for _, xs in cols) + " |\n\n")


WATCHED = {False: "the app followed through /follow like the page",
          True: "the app driven by its page in chromium (headless, Playwright): settings imported as YAML, Start "
                "clicked, the page following the run; no page open during the CLI runs"}


def cpu_line(cpu: dict, browser: bool) -> str:
    def rate(key: str, wall: str = "wall") -> str:
        return f"{cpu[key] / cpu[wall] * 1000:.0f} ms per second"

    if not browser:
        return (f"the app server {rate('server')}, the follower (gradio_client, standing in for the browser) "
                f"{rate('follower')}")
    return (f"the app server {rate('server')}, chromium (all its processes) {rate('chromium')}, the harness "
            f"(Playwright's driver and this script) {rate('harness')}; with the page open and idle before Start: "
            f"chromium {rate('idle_chromium', 'idle_wall')}, the app server {rate('idle_server', 'idle_wall')}")


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The run's settings and --write (shared with bench/ui_alternating.py)."""
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--model", help="an existing model folder (default: a tiny llama of --layers x --hidden)")
    ap.add_argument("--data", help="an existing data folder (default: generated text rows)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--write", help="Append the result to this markdown file.")


def prepare_run(args: argparse.Namespace, out: Path) -> tuple[list, dict, str]:
    """Make `out` (and the tiny model and data if none were given): (the app's form values for the run, the
    engine's environment, a line that describes the run)."""
    from test_ui_client import form
    from tiny import build_text_data, build_tiny_model

    out.mkdir(parents=True)
    model = args.model or build_tiny_model(out / "model", layers=args.layers, hidden=args.hidden, vocab_size=512)
    data = args.data or build_text_data(out / "data", n_train=512, n_valid=16)
    values = form(model=str(model), data=str(data), iters=args.iters, batch_size=args.batch_size,
                  steps_per_report=10, steps_per_eval=0, save_every=args.iters, learning_rate=args.learning_rate,
                  rank=args.rank, alpha=args.alpha, max_seq_length=args.max_seq_length)
    what = (f"model {model}" if args.model else f"Tiny llama ({args.layers} layers, hidden {args.hidden})") + \
        f", batch {args.batch_size}, rank {args.rank}, alpha {args.alpha:g}, {args.iters} steps, packed rows"
    env = runs.engine_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return values, env, what


def write_result(text: str, path: str | None) -> None:
    print(text)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "ui_overhead"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=150)
    add_run_arguments(ap)
    ap.add_argument("--browser", action="store_true",
                    help="Drive the app from its page in chromium instead of following with gradio_client.")
    ap.add_argument("--spawned", action="store_true",
                    help="Also run the CLI as the app starts it (runs.start_training), no app: a third column.")
    args = ap.parse_args()

    from test_ui_client import running_app

    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    values, env, what = prepare_run(args, out)

    cli_rates, spawned_rates, app_rates, delays, cpu, reports = [], [], [], [], {}, 0
    runs_dir = out / "app-runs"
    with running_app(runs_dir, env) as url, contextlib.ExitStack() as stack:
        if args.browser:
            browser, settings = stack.enter_context(chromium()), out / "settings.yaml"
            settings.write_text(export_yaml(form_to_config(dict(zip(FORM_KEYS, values)))), encoding="utf-8")
            start = lambda name: run_in_browser(browser, url, settings, runs_dir, name, cpu)  # noqa: E731
        else:
            from gradio_client import Client

            client = Client(url, verbose=False)
            start = lambda name: run_app(client, values, runs_dir, name, cpu)  # noqa: E731
        for i in range(args.repeats):
            cli_rates.append(run_cli(values, out / "cli" / f"run{i}", env))
            if args.spawned:
                spawned_rates.append(run_spawned(values, out / "spawned" / f"run{i}"))
            rate, d = start(f"run{i}")
            # the page's form must have held exactly the CLI's settings
            assert runs.read_config(runs_dir / f"run{i}") == runs.read_config(out / "cli" / f"run{i}")
            app_rates.append(rate)
            delays += d
            reports += sum(e["event"] == "train" for e in runs.read_events(runs_dir / f"run{i}"))
            print(f"repeat {i}: CLI {cli_rates[-1]:,.0f} tok/s, "
                  + (f"spawned {spawned_rates[-1]:,.0f} tok/s, " if args.spawned else "")
                  + f"app {rate:,.0f} tok/s, plot delay max {max(d):.2f} s", flush=True)
            for side in ("cli", "spawned") if args.spawned else ("cli",):
                print(f"  {side} per report: {report_rates(out / side / f'run{i}')}")
            print(f"  app per report: {report_rates(runs_dir / f'run{i}')}", flush=True)

    paired = statistics.median((a / c - 1) * 100 for c, a in zip(cli_rates, app_rates))
    text = (f"\n### UI overhead (`bench/ui_overhead.py`) — {time.strftime('%Y-%m-%d')}, {platform.machine()} "
            f"{platform.system()}, {os.cpu_count()} CPU cores\n\n"
            f"Command: `.venv/bin/python bench/ui_overhead.py {' '.join(sys.argv[1:])}`  \n"
            f"{what}; {WATCHED[args.browser]}.\n\n"
            + rates_table(cli_rates, spawned_rates, app_rates) +
            f"App vs the CLI run just before it: median {paired:+.1f}% (each pair: "
            f"{', '.join(f'{(a / c - 1) * 100:+.1f}%' for c, a in zip(cli_rates, app_rates))}).\n"
            f"\nPlot update after the train report: mean {statistics.mean(delays):.2f} s, "
            f"max {max(delays):.2f} s over {len(delays)} reports{' (drawn in the page)' if args.browser else ''}"
            f"{f'; {reports - len(delays)} of {reports} never appeared' if reports > len(delays) else ''}. "
            f"CPU used while the app's runs trained: {cpu_line(cpu, args.browser)}, of the "
            f"{os.cpu_count() * 1000} ms per second this machine has.\n")
    write_result(text, args.write)


if __name__ == "__main__":
    main()
