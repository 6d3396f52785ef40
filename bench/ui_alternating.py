"""What watching costs a run: one run from the app, watched in some windows and not in others (bench/README.md).

    .venv/bin/python bench/ui_alternating.py [--iters 1500] [--window 5]
    python3 bench/ui_alternating.py --model bench/out/gpu/model --data bench/out/gpu/uniform --rank 8 \\
        --alpha 16 --learning-rate 1e-5 --max-seq-length 1024 --iters 3000   # GPU, after gpu_bench.py --part prep

bench/ui_overhead.py compares whole runs, CLI against app; on the lent GPU machine the same CLI run drifts
between ~85k and ~150k tokens/s for seconds at a time, which swamps a 2% question. Here one
run, started from the real app (`python app.py`, its /start endpoint), is watched through the app's /follow
stream (the updates the page gets) during "on" windows and not at all during "off" windows, alternating
every --window seconds. Each train report covers the steps since the previous one; the reports whose span lies
inside one window are summed per side (tokens / seconds), and each on window is compared with the mean of the
off windows on either side of it (so a steady drift cancels). What is left is the UI's cost. Both sides look
at the run folder (has it ended?), so only the watching differs. The windows go to windows.json and when each
train point was first seen to seen_at.json in the output folder, for a second look at the run's events.jsonl
(app-runs/run/).

With --browser the watcher is the app's page itself, in Debian's chromium (headless, Playwright), opened on the
run: in the on windows it draws the updates the app streams to it; in the off windows it is frozen through the
DevTools protocol (its JavaScript paused in the debugger), so it draws nothing (the server still sends).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from page_cpu import open_page  # noqa: E402
from ui_overhead import (  # noqa: E402
    WATCH_PLOT,
    Follower,
    add_run_arguments,
    app_pid,
    chromium,
    cpu_seconds,
    finished,
    helper_cpu,
    prepare_run,
    write_result,
)

from lora_app import runs  # noqa: E402


def window_rates(events: list[dict], windows: list[tuple[float, float, bool]]) -> list[tuple[bool, float, float]]:
    """(on, tokens, seconds) per window, from the train reports whose span (previous report -> this one) lies
    inside it. Step 1 (loading, compiling) and the reports that straddle a window's edge are left out."""
    first = next(e for e in events if e["event"] == "first_step")
    prev_time, prev_tokens = first["time"], first["tokens"]
    spans = []
    for e in events:
        if e["event"] == "train" and e["time"] > prev_time:
            spans.append((prev_time, e["time"], e["trained_tokens"] - prev_tokens))
            prev_time, prev_tokens = e["time"], e["trained_tokens"]
    out = []
    for start, end, on in windows:
        inside = [(t1 - t0, n) for t0, t1, n in spans if t0 >= start and t1 <= end]
        if inside:
            out.append((on, sum(n for _, n in inside), sum(s for s, _ in inside)))
    return out


class ClientViewer:
    """gradio_client standing in for the page: the app's /follow stream in the on windows, cancelled in the off
    windows. `client` must be the one that started the run: the run shown is state of its session."""

    name, off = "gradio_client following /follow (this script)", "no stream"

    def __init__(self, client):
        self.client, self.seen_at, self.follower = client, {}, None

    def show(self, on: bool) -> None:
        if on:
            self.follower = Follower(self.client, self.seen_at)
        elif self.follower:
            self.follower.close()
            self.follower = None

    def tick(self, on: bool) -> None:
        if self.follower:
            self.follower.take()

    def cpu(self) -> float:
        return time.process_time()

    def seen(self) -> dict[int, float]:
        self.show(False)
        return self.seen_at


class PageViewer:
    """The app's page in chromium (headless, Playwright), showing the run: in the on windows it draws the updates
    the app streams to it; in the off windows its JavaScript is paused in the debugger (CDP Debugger.pause,
    taking hold when the page next runs any script), so it draws nothing. The server still reads the run folder
    and sends each update in the off windows: that part of the UI's cost is the server's CPU in the off
    windows, given beside the result. (Page.setWebLifecycleState "frozen" does not stop a visible page.)"""

    name, off = "the app's page in chromium, drawing the updates", "the page paused in the debugger"

    def __init__(self, browser, url: str):
        self.page = open_page(browser, url)
        self.page.locator("#progress").get_by_text("running").wait_for(timeout=120_000)
        self.page.evaluate(WATCH_PLOT)
        self.cdp = self.page.context.new_cdp_session(self.page)

    def show(self, on: bool) -> None:
        if on:
            self.cdp.send("Debugger.disable")  # resumes, and drops a pause that has not taken hold yet
        else:
            self.cdp.send("Debugger.enable")
            self.cdp.send("Debugger.pause")

    def tick(self, on: bool) -> None:
        pass

    def cpu(self) -> float:
        return sum(cpu for kind, cpu in helper_cpu().values() if kind == "chromium")

    def seen(self) -> dict[int, float]:
        self.show(True)
        return {int(step): t for step, t in self.page.evaluate("window.seenAt").items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "ui_alternating"))
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--window", type=float, default=5.0, help="seconds per on / off window")
    ap.add_argument("--browser", action="store_true",
                    help="Watch with the app's page in chromium (frozen in the off windows) instead of gradio_client.")
    add_run_arguments(ap)
    args = ap.parse_args()

    from gradio_client import Client
    from test_ui_client import running_app

    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    values, env, what = prepare_run(args, out)

    runs_dir, windows, served, viewed = out / "app-runs", [], {True: 0.0, False: 0.0}, 0.0
    with running_app(runs_dir, env) as url, contextlib.ExitStack() as stack:
        server = app_pid(runs_dir)
        client = Client(url, verbose=False)
        client.predict("run", *values, api_name="/start")
        run_dir = runs_dir / "run"
        while not any(e["event"] == "first_step" for e in runs.read_events(run_dir)):
            assert not finished(run_dir), f"the run ended before its first step: {run_dir / 'train.log'}"
            time.sleep(0.5)
        viewer = PageViewer(stack.enter_context(chromium()), url) if args.browser else ClientViewer(client)
        on, state = True, None
        while state is None:
            viewer.show(on)
            start, cpu0, seen0 = time.time(), cpu_seconds(server), viewer.cpu()
            while time.time() - start < args.window and state is None:
                now = time.time()
                viewer.tick(on)
                state = finished(run_dir)
                time.sleep(max(0.0, 0.25 - (time.time() - now)))
            windows.append((start, time.time(), on))
            served[on] += cpu_seconds(server) - cpu0
            viewed += viewer.cpu() - seen0 if on else 0.0
            on = not on
        seen_at = viewer.seen()

    events = runs.read_events(run_dir)
    assert state.status == "done", f"{state.status}: see {run_dir / 'train.log'}"
    reports = {e["step"]: e["time"] for e in events if e["event"] == "train"}
    watched = [(a, b) for a, b, on in windows if on]
    # Reports with 2 s of their on window left: an update comes up to FOLLOW_GAP_S + FOLLOW_CHECK_S (0.9 s) after
    # its report, and one later than the window's end is first seen in the next on window.
    delays = [seen_at[s] - t for s, t in reports.items() if s in seen_at and any(a <= t < b - 2.0 for a, b in watched)]
    got = window_rates(events, windows)
    rate = {side: sum(n for o, n, _ in got if o == side) / sum(s for o, _, s in got if o == side)
            for side in (True, False)}
    speed = [(on, n / s) for on, n, s in got]
    pairs = [mid / ((before + after) / 2) for (o0, before), (o1, mid), (o2, after) in zip(speed, speed[1:], speed[2:])
             if o1 and not o0 and not o2]  # on windows between two off ones
    (out / "windows.json").write_text(json.dumps(windows), encoding="utf-8")
    (out / "seen_at.json").write_text(json.dumps(seen_at), encoding="utf-8")
    on_wall = sum(b - a for a, b in watched)
    off_wall = sum(b - a for a, b, on in windows if not on)
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    text = (f"\n### UI overhead inside one run (`bench/ui_alternating.py`) — {time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores\n\n"
            f"Command: `{Path(sys.executable).name} bench/ui_alternating.py {' '.join(sys.argv[1:])}`  \n"
            f"{what}; started from the app; {viewer.name} in the on windows, {viewer.off} in the off windows "
            f"({args.window:g} s each; {len(got)} windows with whole reports).\n\n"
            f"| | tokens/s |\n|---|---:|\n| watched (on) | {rate[True]:,.0f} |\n| not watched (off) | "
            f"{rate[False]:,.0f} |\n| on / off | {(rate[True] / rate[False] - 1) * 100:+.1f}% |\n\n"
            "Each on window against the mean of the off windows on either side: median "
            f"{(statistics.median(pairs) - 1) * 100:+.1f}% over {len(pairs)} windows (quartiles "
            f"{(quartiles[0] - 1) * 100:+.1f}% / {(quartiles[2] - 1) * 100:+.1f}%).  \n"
            f"Plot update after the train report (watched windows): mean {statistics.mean(delays):.2f} s, max "
            f"{max(delays):.2f} s over {len(delays)} reports. CPU per second in the on windows: the app server "
            f"{served[True] / on_wall * 1000:.0f} ms (off windows: {served[False] / off_wall * 1000:.0f}), the "
            f"watcher {viewed / on_wall * 1000:.0f} ms.\n")
    write_result(text, args.write)


if __name__ == "__main__":
    main()
