"""End to end in a real browser (Chromium or Chrome via Playwright, found by tests/browser.py): tiny model,
rank/alpha, two modules, Start, a loss curve on the page, Stop, the adapter on disk. With LORA_APP_SCREENSHOT=1 the
page mid-training is also saved as assets/screenshot.png, the README's picture (off by default: tests leave
tracked files alone)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import launch
from test_ui_client import form, running_app, wait_until

from lora_app import runs
from lora_app.config import save_config_json
from lora_app.ui.settings import FORM_KEYS, form_to_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def browser():
    with launch() as b:
        yield b


# The points a Vega plot (Compare) shows: it labels each hover point "step: 10; loss: 2.31; series: train".
POINT_LABELS = """id => Array.from(document.querySelectorAll(`#${id} [aria-roledescription="point"]`),
                                point => point.getAttribute("aria-label") || "")"""


def point_fields(page, elem_id: str) -> list[dict[str, str]]:
    """The fields of each point the plot `elem_id` shows now."""
    return [dict(part.split(": ", 1) for part in label.split("; ") if ": " in part)
            for label in page.evaluate(POINT_LABELS, elem_id)]


# The points the live loss plot shows: each series' path lists them (loss_plot.py), "x,y,step,loss ...".
LOSS_POINTS = """() => Array.from(document.querySelectorAll("#loss-plot [data-points]"), path =>
  path.dataset.points.split(" ").map(point => [path.dataset.series, Number(point.split(",")[2])])).flat()"""


def drawn(page) -> set[tuple[str, int]]:
    """{(series, step)} of the points the page's loss plot shows now."""
    return {(series, step) for series, step in page.evaluate(LOSS_POINTS)}


def fill(page, elem_id: str, value: str, tag: str = "textarea") -> None:
    box = page.locator(f"#{elem_id} {tag}").first
    box.fill(value)
    box.press("Enter" if tag == "textarea" else "Tab")


@pytest.mark.slow
def test_train_in_the_browser(browser, tiny_model, text_data, tmp_path, engine_env):
    """A whole run from the page. The page opens on an earlier run (the newest), so Start also shows that the
    live view moves to the new run (it follows one run at a time: train_step.follow)."""
    runs_dir = tmp_path / "runs"
    fake_run(runs_dir, "earlier", [3.0, 2.5], 1e-4)
    with running_app(runs_dir, engine_env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        fill(page, "model-path", str(tiny_model))  # Enter inspects
        page.locator("#model-info").get_by_text("2 blocks").wait_for(timeout=60_000)

        page.get_by_role("tab", name="2 · Adapter").click()
        fill(page, "rank", "4", "input")
        fill(page, "alpha", "8", "input")
        page.locator("#scale").get_by_text("2", exact=True).wait_for()  # not the "0.2s" of a pending status
        modules = page.locator("#modules")
        modules.get_by_label("self_attn.v_proj").uncheck()
        modules.get_by_label("mlp.down_proj").check()
        page.locator("#adapter-summary").get_by_text(re.compile("2 module")).wait_for()

        page.get_by_role("tab", name="3 · Data").click()
        fill(page, "data-path", str(text_data))
        page.get_by_role("tab", name="4 · Train").click()
        fill(page, "iters", "6000", "input")
        fill(page, "learning-rate", "0.002", "input")
        fill(page, "steps-per-report", "20", "input")
        page.locator("#start").click()
        page.locator("#train-message").get_by_text("Started").wait_for(timeout=30_000)

        # Wait for a curve with enough points to read as one, then photograph the page mid-training.
        run_dir = next(p for p in runs_dir.iterdir() if p.name != "earlier")
        wait_until(lambda: sum(e["event"] == "train" for e in runs.read_events(run_dir)) >= 40, 120,
                   "40 loss reports")
        page.locator("#progress").get_by_text("running").wait_for(timeout=30_000)
        # Both series drawn: points of each in the plot (the legend names both from the start).
        wait_until(lambda: {series for series, _ in drawn(page)} == {"train", "valid"}, 30, "both series drawn")
        page.get_by_text("Hyper-parameters").click()  # folded, so the picture shows the live view
        time.sleep(2)  # the plot's last redraw
        shot = tmp_path / "screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
        if os.environ.get("LORA_APP_SCREENSHOT") == "1":
            shutil.copyfile(shot, ROOT / "assets" / "screenshot.png")

        page.locator("#stop").click()
        page.locator("#progress").get_by_text("stopped").wait_for(timeout=60_000)
        config = runs.read_config(run_dir)
        assert config["rank"] == 4 and config["alpha"] == 8.0
        assert sorted(config["modules"]) == ["mlp.down_proj", "self_attn.q_proj"]
        assert (run_dir / "adapters" / "adapters.safetensors").stat().st_size > 0
        page.close()


@pytest.mark.slow
def test_plot_draws_each_update_at_once(browser, tiny_model, text_data, tmp_path, engine_env):
    """The page draws an update's points when it arrives, not at the next changed one: a finished run's curve
    appears on opening the page, and a report with nothing changing after it is drawn within 2 s (the page
    still follows a finished run: it may be resumed). Gradio 6.31's LinePlot, which drew this plot before
    loss_plot.py, drew an update's frame only at the next changed one when the update also changed a prop."""
    runs_dir = tmp_path / "runs"
    run_dir = runs_dir / "cli-run"
    run_dir.mkdir(parents=True)
    values = form(model=str(tiny_model), data=str(text_data), iters=30, steps_per_report=10, steps_per_eval=15,
                  save_every=30, learning_rate=1e-3)
    save_config_json(form_to_config(dict(zip(FORM_KEYS, values))), run_dir / "config.json")
    with open(run_dir / "train.log", "wb") as log:
        subprocess.run([sys.executable, "-m", "lora_app", "train", "--config", str(run_dir / "config.json"),
                        "--out", str(run_dir)], env=engine_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       check=True, timeout=300)
    events = runs.read_events(run_dir)
    points = {("train", e["step"]) for e in events if e["event"] == "train"} | {
        ("valid", e["step"]) for e in events if e["event"] == "val"}
    assert ("train", 30) in points and ("valid", 15) in points
    with running_app(runs_dir, engine_env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)  # a fresh page shows the newest run: this finished one, whose folder no longer changes
        page.get_by_role("tab", name="4 · Train").click()
        page.locator("#progress").get_by_text("done").wait_for(timeout=30_000)
        wait_until(lambda: drawn(page) >= points, 5, f"the finished run's points {sorted(points)} drawn, "
                   f"not only {sorted(drawn(page))}")

        # One more report, then nothing: it must be drawn by the update that first carries it.
        report = runs.append_event(run_dir, "train", step=40, loss=1.0)
        while ("train", 40) not in drawn(page):
            assert time.time() - report["time"] < 2.0, f"step 40 not drawn 2 s after its report: {drawn(page)}"
            time.sleep(0.05)
        assert drawn(page) >= points  # the rest of the curve is still there

        # The pointer on that point names it (loss_plot.HOVER_JS), and leaving the plot hides the name.
        page.locator("#loss-plot").scroll_into_view_if_needed()
        page.mouse.move(*page.evaluate(POINT_ON_SCREEN, ["train", 40]))
        tip = page.locator(".loss-tip")
        tip.get_by_text("train · step 40 · loss 1").wait_for(timeout=5_000)
        page.mouse.move(5, 5)
        tip.wait_for(state="hidden", timeout=5_000)
        page.close()


# Where (series, step) of the live loss plot is on the screen: its place in the SVG's view, scaled.
POINT_ON_SCREEN = """([series, step]) => {
  const svg = document.querySelector("#loss-plot svg"), box = svg.getBoundingClientRect();
  const k = box.width / svg.viewBox.baseVal.width;
  const path = svg.querySelector(`[data-series="${series}"]`);
  const [x, y] = path.dataset.points.split(" ").map(p => p.split(",")).find(p => Number(p[2]) === step);
  return [box.left + x * k, box.top + y * k];
}"""


def fake_run(runs_dir: Path, name: str, losses: list[float], lr: float) -> None:
    """A finished run folder with train reports every 10 steps (no training: only what Compare reads)."""
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(f'{{"learning_rate": {lr}}}', encoding="utf-8")
    for k, loss in enumerate(losses, start=1):
        runs.append_event(run_dir, "train", step=10 * k, loss=loss, trained_tokens=1000 * k)
    runs.append_event(run_dir, "status", status="done", step=10 * len(losses))


def test_compare_draws_the_runs_chosen(browser, tmp_path, engine_env):
    """Compare draws the runs just chosen, on each click: Gradio 6.31's LinePlot rebuilt its chart from the
    previous value when an update changed a prop (the x column, the y title, the legend)."""
    runs_dir = tmp_path / "runs"
    fake_run(runs_dir, "alpha", [3.0, 2.5, 2.0], 1e-4)
    fake_run(runs_dir, "beta", [3.1, 2.2, 1.9, 1.5], 2e-4)
    fake_run(runs_dir, "gamma", [2.9, 2.8], 3e-4)
    with running_app(runs_dir, engine_env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_role("tab", name="Compare").click()

        def compare(names: list[str], align: str = "step") -> None:
            box = page.get_by_label("Runs to compare (2 or more)")
            for _ in range(10):  # clear the choice: each run chosen has a remove button
                if not page.locator(".token-remove").count():
                    break
                page.locator(".token-remove").first.click()
            for name in names:
                box.click()
                page.get_by_role("option", name=name, exact=True).click()
            page.get_by_label(align, exact=True).check()
            page.get_by_role("button", name="Compare", exact=True).click()

        def curves() -> set[tuple[str, int]]:
            return {(series, x) for series, x in compare_drawn(page)}

        compare(["alpha", "beta"])
        want = {(f"{n} train", 10 * k) for n, m in (("alpha", 3), ("beta", 4)) for k in range(1, m + 1)}
        wait_until(lambda: curves() == want, 5, f"alpha and beta drawn, not {sorted(curves())}")
        compare(["beta", "gamma"], "tokens seen")
        want = {(f"{n} train", 1000 * k) for n, m in (("beta", 4), ("gamma", 2)) for k in range(1, m + 1)}
        wait_until(lambda: curves() == want, 5, f"beta and gamma by tokens drawn, not {sorted(curves())}")
        page.close()


def compare_drawn(page) -> set[tuple[str, int]]:
    """{(curve, step or tokens)} of the points the Compare plot shows now."""
    found = set()
    for f in point_fields(page, "compare-plot"):
        for key in ("step", "tokens"):
            try:  # mid-redraw a label may still name the other axis, as "undefined": that point is not drawn yet
                x = int(float(f[key].replace(",", "")))
            except (KeyError, ValueError):
                continue
            if "curve" in f:
                found.add((f["curve"], x))
            break
    return found


# Before the page's own scripts: count the animation frames the page asks for (page_script.py wraps this).
COUNT_FRAMES = """window.frames_asked = 0;
const ask = window.requestAnimationFrame.bind(window);
window.requestAnimationFrame = callback => { window.frames_asked++; return ask(callback); };"""
LIVE_OUTPUTS = ["progress", "train-stats", "loss-plot", "samples", "log", "showing"]
WATCH_OUTPUTS = """ids => { window.mutations = 0;
  for (const id of ids) new MutationObserver(found => { window.mutations += found.length; }).observe(
    document.getElementById(id), {subtree: true, childList: true, attributes: true, characterData: true}); }"""


@pytest.mark.slow
def test_idle_page_does_no_work(browser, tmp_path, engine_env):
    """An open page costs a CPU-only training run little: showing a run that does not change, it sends no
    requests (it used to poll once a second: ~50 ms of CPU a second for the page and the server together,
    train_step.follow), leaves the six live outputs alone (gradio put a loading status on each output of a
    poll, even hidden: 240 changes in 4 s) and asks for no animation frames (gradio 6.31's loading screen left
    a loop of 60 frames a second running for good: page_script.py)."""
    runs_dir = tmp_path / "runs"
    fake_run(runs_dir, "alpha", [3.0, 2.5, 2.0], 1e-4)
    with running_app(runs_dir, engine_env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script(COUNT_FRAMES)
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url)
        page.get_by_role("tab", name="4 · Train").click()
        page.locator("#progress").get_by_text("done").wait_for(timeout=30_000)
        wait_until(lambda: len(drawn(page)) == 3, 5, "the run's points drawn")
        time.sleep(5)  # the loading screen's last animation ends
        page.evaluate(WATCH_OUTPUTS, LIVE_OUTPUTS)
        page.evaluate("window.frames_asked = 0")
        before, start = len(requests), time.monotonic()
        time.sleep(4)
        frames, seconds = page.evaluate("window.frames_asked"), time.monotonic() - start
        assert requests[before:] == [], "an idle page sent requests"
        assert page.evaluate("window.mutations") == 0, "idle ticks touched the live outputs"
        assert frames / seconds < 2, f"an idle page asked for {frames / seconds:.0f} animation frames a second"
        page.close()


@pytest.mark.slow
def test_live_view_repaints_once_per_report(browser, tmp_path, engine_env):
    """Each report of a live run changes the page once: the progress bar jumps to its new width. It used to
    animate (a 0.5 s CSS transition), which laid out and repainted the page on every frame, ~30 times a report:
    most of the ~190 ms of chromium CPU a second that a shown run took from a CPU-only training run."""
    runs_dir = tmp_path / "runs"
    run_dir = runs_dir / "live"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"iters": 100}', encoding="utf-8")
    alive = subprocess.Popen(["sleep", "120"])  # stands in for the training process: the run shows as running
    try:
        (run_dir / "train.pid").write_text(str(alive.pid))
        runs.append_event(run_dir, "status", status="running", total_steps=100)
        with running_app(runs_dir, engine_env) as url:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="4 · Train").click()
            page.locator("#progress").get_by_text("running").wait_for(timeout=30_000)
            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")

            def layouts() -> float:
                return next(m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]
                            if m["name"] == "LayoutCount")

            before = layouts()
            for step in range(10, 60, 10):  # five reports, one a second: the bar moves 10% each time
                runs.append_event(run_dir, "train", step=step, loss=1.0, trained_tokens=100 * step)
                time.sleep(1.0)
            page.locator("#progress").get_by_text("step 50/100").wait_for(timeout=5_000)
            per_report = (layouts() - before) / 5
            assert per_report < 8, f"{per_report:.0f} layouts per report: something on the live view animates"
            page.close()
    finally:
        alive.kill()
        alive.wait()
