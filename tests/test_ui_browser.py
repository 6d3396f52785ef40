"""End to end in a real browser (Debian's chromium via Playwright): tiny model, rank/alpha, two modules,
Start, a loss curve on the page, Stop, the adapter on disk. With LORA_APP_SCREENSHOT=1 the page mid-training
is also saved as assets/screenshot.png, the README's picture (off by default: tests leave tracked files alone)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from test_ui_client import running_app, wait_until

from lora_app import runs

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: install it with `apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def fill(page, elem_id: str, value: str, tag: str = "textarea") -> None:
    box = page.locator(f"#{elem_id} {tag}").first
    box.fill(value)
    box.press("Enter" if tag == "textarea" else "Tab")


def test_train_in_the_browser(browser, tiny_model, text_data, tmp_path, engine_env):
    runs_dir = tmp_path / "runs"
    with running_app(runs_dir, engine_env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        fill(page, "model-path", str(tiny_model))  # Enter inspects
        page.locator("#model-info").get_by_text("2 blocks").wait_for(timeout=60_000)

        page.get_by_role("tab", name="2 · Adapter").click()
        fill(page, "rank", "4", "input")
        fill(page, "alpha", "8", "input")
        page.locator("#scale").get_by_text("2").wait_for()
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
        run_dir = next(runs_dir.iterdir())
        wait_until(lambda: sum(e["event"] == "train" for e in runs.read_events(run_dir)) >= 40, 120,
                   "40 loss reports")
        page.locator("#progress").get_by_text("running").wait_for(timeout=30_000)
        # Both series drawn: the legend lists them (it stays empty when the plot drew no lines).
        page.locator("#loss-plot").get_by_text("valid", exact=True).wait_for(timeout=30_000)
        page.locator("#loss-plot").get_by_text("train", exact=True).wait_for(timeout=30_000)
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
