"""The browser for the page tests: Chromium or Chrome, wherever it is on Linux or macOS, driven by Playwright.

Tried in order: $LORA_APP_BROWSER, a chromium or chrome on PATH (Debian/Ubuntu), /usr/bin, the macOS apps in
/Applications, then Playwright's own chromium (`python -m playwright install chromium`). None: the test fails with
one line that says what to install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# No background traffic: on a closed network Chromium's update and sync connections fail, many at a time.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
NAMES = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
APPS = ["/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
        "/Applications/Chromium.app/Contents/MacOS/Chromium"]
MISSING = ("no Chromium or Chrome found: install one (Debian/Ubuntu: `sudo apt-get install chromium`; macOS: "
           "Google Chrome in /Applications) or Playwright's (`.venv/bin/python -m playwright install chromium`), "
           "or set LORA_APP_BROWSER to its executable")


def installed_browser() -> Path | None:
    """The first Chromium or Chrome executable installed on this machine, outside Playwright."""
    candidates = [os.environ.get("LORA_APP_BROWSER"), *map(shutil.which, NAMES),
                  *(f"/usr/bin/{name}" for name in NAMES), *APPS, *(str(Path.home()) + app for app in APPS)]
    return next((Path(c) for c in candidates if c and os.access(c, os.X_OK) and Path(c).is_file()), None)


@contextlib.contextmanager
def launch() -> Iterator:
    """A headless Playwright browser for the tests; pytest.fail (one line) when this machine has none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run the tests with ./launch.sh --test", pytrace=False)
    executable = installed_browser()
    with sync_playwright() as p:
        if executable is None and not Path(p.chromium.executable_path).exists():
            pytest.fail(MISSING, pytrace=False)
        b = p.chromium.launch(executable_path=str(executable) if executable else None, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()
