"""Preference training from the page (issue 28), in a real browser: pair data previews as the objective trains it in
the Data step (sft: the chosen rows; choosing DPO in the Train step turns it into chosen / rejected pairs); with the
DPO objective the live view draws the reward margin and accuracy beside the loss."""

from __future__ import annotations

import pytest
from browser import launch
from test_preference import preference_rows, write
from test_ui_browser import fill
from test_ui_client import running_app, wait_until

from lora_app import runs

# The metric charts the live view shows (loss_plot.metric_svg): {metric: number of points}.
METRIC_POINTS = """() => Object.fromEntries(Array.from(document.querySelectorAll("#loss-plot [data-metric]"), box =>
  [box.dataset.metric, Array.from(box.querySelectorAll("[data-metric-points]"),
                                  path => path.dataset.metricPoints.split(" ").length).reduce((a, b) => a + b, 0)]))"""


@pytest.mark.slow
def test_dpo_from_the_page(tiny_model, tmp_path, engine_env) -> None:
    data = tmp_path / "pairs"
    data.mkdir()
    write(data / "train.jsonl", preference_rows(32, 1))
    write(data / "valid.jsonl", preference_rows(8, 7))
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with launch() as browser, running_app(runs_dir, engine_env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        fill(page, "model-path", str(tiny_model))
        page.locator("#model-info").get_by_text("2 blocks").wait_for(timeout=60_000)

        page.get_by_role("tab", name="3 · Data").click()
        fill(page, "data-path", str(data))
        page.get_by_role("button", name="Preview and statistics").click()
        preview = page.locator("#data-preview")
        # objective sft (the default) trains on the chosen answers: the preview shows those rows only
        preview.get_by_text("line 1 · chosen").wait_for(timeout=60_000)
        page.locator("#data-stats").get_by_role("cell", name="preference").wait_for()
        page.locator("#data-stats").get_by_text("training on the chosen answers").wait_for()
        assert preview.get_by_text("· rejected").count() == 0

        page.get_by_role("tab", name="4 · Train").click()
        choice = page.locator("#objective input").first
        choice.click()
        page.get_by_role("option", name="dpo", exact=True).click()
        page.get_by_role("tab", name="3 · Data").click()  # choosing DPO turns the preview into pairs
        preview.get_by_text("line 1 · rejected").wait_for(timeout=60_000)
        preview.get_by_text("line 1 · chosen").wait_for()
        assert page.locator("#data-stats").get_by_text("training on the chosen answers").count() == 0
        page.get_by_role("tab", name="4 · Train").click()
        fill(page, "iters", "20", "input")
        fill(page, "steps-per-report", "5", "input")
        page.locator("#start").click()
        page.locator("#train-message").get_by_text("Started").wait_for(timeout=30_000)
        shown = wait_until(lambda: (m := page.evaluate(METRIC_POINTS)).get("reward_margin", 0) >= 2 and m, 120,
                           "the reward margin chart")
        assert {"learning_rate", "grad_norm", "reward_margin", "reward_accuracy"} <= set(shown)
        page.locator("#train-stats").get_by_text("reward margin").wait_for()
        run_dir = next(runs_dir.iterdir())
        assert runs.read_config(run_dir)["objective"] == "dpo"
        page.close()
