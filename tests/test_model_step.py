"""The Model step's downloads and catalog against the fake hub (tests/hubserver.py): the page's download process
(ui/downloads.py) reports moving progress, Cancel leaves neither a partial file nor a half model in the catalog, a
finished download is listed on disk; and in a real browser, the catalog's verdict, a moving progress bar and the
model ready to inspect."""

from __future__ import annotations

import time

import pytest
from browser import launch
from test_download import REPO, cache, hub, needed, partials, served  # noqa: F401 - fixtures
from test_ui_client import running_app, wait_until

from lora_app import catalog
from lora_app import hub as hub_api
from lora_app.ui.downloads import Downloads


@pytest.fixture
def hub_env(monkeypatch, hub, cache, tmp_path):  # noqa: F811 - the fixtures imported above
    """The fake hub for this process (huggingface_hub read its settings at import) and the processes it starts."""
    from huggingface_hub import constants

    for name, value in {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
                        "HF_HUB_DISABLE_TELEMETRY": "1", "LORA_APP_HOME": str(tmp_path / "app-home")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return hub


def on_disk(cache_models: list[dict]) -> list[str]:
    return [e.name for e in catalog.entries(None, cache_models, None) if e.where == "on disk"]


def test_cancel_mid_file_leaves_no_partial_file_and_no_model(hub_env, cache):  # noqa: F811
    hub_env.throttle = 60_000  # ~8 s for the weights: Cancel lands mid-file
    downloads = Downloads()
    item = downloads.start(REPO)
    wait_until(lambda: item.done > 50_000 and partials(cache), 60, "bytes of the weights on disk")
    seen = item.done
    wait_until(lambda: item.done > seen, 30, "progress that moves")
    downloads.cancel(REPO)
    assert item.status == "cancelled"
    assert partials(cache) == []
    assert hub_api.cached_model(REPO) is None
    assert REPO not in on_disk(hub_api.cached_models())


def test_a_finished_download_is_on_disk_in_the_catalog(hub_env, cache, needed):  # noqa: F811
    downloads = Downloads()
    item = downloads.start(REPO)
    wait_until(lambda: not item.active, 60, "the download to end")
    assert item.status == "done", item.message
    assert item.done == item.total == sum(len(b) for b in needed.values())
    assert hub_api.cached_model(REPO) is not None
    assert REPO in on_disk(hub_api.cached_models())
    assert downloads.start(REPO) is not item  # a finished download can be started again (a no-op: all cached)


def test_a_failed_download_says_why_in_one_line(hub_env):
    downloads = Downloads()
    item = downloads.start("org/missing")
    wait_until(lambda: not item.active, 60, "the download to end")
    assert item.status == "error" and "org/missing" in item.message and "\n" not in item.message


def row_cells(page, repo: str) -> list[str]:
    """The catalog row of `repo` as the page shows it, cell by cell (empty when it is not listed)."""
    cells = [c.strip() for c in page.locator("#model-catalog [role=grid]").inner_text().splitlines() if c.strip()]
    n = len(catalog.COLUMNS)
    assert cells[:n] == catalog.COLUMNS  # the header, then one cell per line
    return next((cells[i:i + n] for i in range(n, len(cells), n) if cells[i] == repo), [])


@pytest.mark.parametrize("repo", ["-h/x", "--json", "org/name/extra", "../../etc", ""])
def test_only_a_repo_id_reaches_the_download_command(repo):
    with pytest.raises(hub_api.HubError, match="not a hub repo id"):
        Downloads().start(repo)


@pytest.mark.slow
def test_catalog_download_in_the_browser(hub_env, tmp_path, engine_env):
    """Check a repo on the hub, see its row with a verdict, download it with a moving progress bar, and find it
    ready: on disk in the catalog and inspected."""
    import os

    hub_env.throttle = 150_000  # ~3 s: several frames of the bar
    env = {**engine_env, **{k: os.environ[k] for k in ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "LORA_APP_HOME")}}
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with launch() as browser, running_app(runs_dir, env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        table = page.locator("#model-catalog")
        table.get_by_text("Qwen3-0.6B-4bit").first.wait_for(timeout=60_000)
        assert any(mark in table.inner_text() for mark in ("fits", "tight", "does not fit"))

        page.locator("#hub-repo textarea").fill(REPO)
        page.locator("#check-repo").click()
        page.locator("#model-message").get_by_text("found on the hub").wait_for(timeout=30_000)
        wait_until(lambda: row_cells(page, REPO)[1:2] == ["hub"], 30, "the checked repo's row")

        page.locator("#download-model").click()
        bar = page.locator("#download-progress .lora-progress")
        bar.wait_for(timeout=30_000)
        done = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and bar.get_attribute("data-status") != "done":
            done.add(int(bar.get_attribute("data-done") or 0))
            time.sleep(0.2)
        assert bar.get_attribute("data-status") == "done"
        assert len({d for d in done if d > 0}) >= 2, f"the bar did not move: {sorted(done)}"
        page.locator("#model-message").get_by_text("downloaded and ready").wait_for(timeout=30_000)
        wait_until(lambda: row_cells(page, REPO)[1:2] == ["on disk"], 30, "the repo on disk in the catalog")
        assert page.locator("#model-path textarea").input_value() == REPO

        page.locator("#inspect-model").click()
        page.locator("#model-info").get_by_text("2 blocks").wait_for(timeout=60_000)
        page.close()
