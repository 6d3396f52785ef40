"""The Test step's chat in a real browser (Chromium or Chrome via Playwright, tests/browser.py): three turns in both
columns, each turn's prompt holding the turns before it; Stop ends a long answer; starting a training run ends the
chat's model worker and the chat says it is paused."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from browser import launch
from test_ui_client import running_app, wait_until

from lora_app import runs

# "**Base**: 12 tokens · first token 0.01 s · 900.0 tokens/s · prompt 57 tokens (40 cached)" (Reply.stats)
STATS = re.compile(r"(Base|Adapter): (\d+) tokens · .*?prompt (\d+) tokens \((\d+) cached\)")


def stats(page) -> dict[str, tuple[int, int, int]]:
    """{column: (answer tokens, prompt tokens, cached prompt tokens)} of the last turn, from the status line."""
    text = page.locator("#chat-status").inner_text()
    return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in STATS.finditer(text)}


def messages(page, elem_id: str) -> list[str]:
    return page.locator(f"#{elem_id} .message-row").all_inner_texts()


def answered(page, n_messages: int) -> bool:
    """Both columns hold n_messages and both answers are complete (the token counts come with the end)."""
    return (len(messages(page, "chat-base")) == len(messages(page, "chat-adapter")) == n_messages
            and set(stats(page)) == {"Base", "Adapter"})


def send(page, text: str) -> None:
    box = page.locator("#chat-message textarea")
    box.fill(text)
    box.press("Enter")


def set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Tab")


@pytest.mark.slow
def test_chat_in_the_browser(tiny_model, tiny_adapter, chat_data, tmp_path, engine_env):
    runs_dir = tmp_path / "runs"
    shutil.copytree(tiny_adapter, runs_dir / "tuned" / "adapters")  # a finished run's adapter, listed from the start
    (runs_dir / "tuned" / "config.json").write_text(json.dumps({"model": str(tiny_model)}))
    with launch() as browser, running_app(runs_dir, engine_env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(url)
        page.get_by_role("tab", name="5 · Test").click()
        box = page.locator("#test-model textarea")
        box.fill(str(tiny_model))
        box.press("Tab")
        page.locator("#test-adapter input").click()
        page.get_by_role("option", name=re.compile("tuned · latest")).click()
        page.get_by_role("button", name=re.compile("^System prompt, sampling")).click()
        set_number(page, "max-tokens", "6")

        # Three turns: each column's prompt holds the turns before it (its prompt grows by more than the new
        # message: the previous answer is in it) and starts with what the worker's prompt cache holds.
        seen: dict[str, tuple[int, int, int]] = {}
        for turn, text in enumerate(["the red cat sat on the mat .", "the big dog ran under the log .",
                                     "the small bird flew over the tree ."], start=1):
            send(page, text)
            wait_until(lambda n=2 * turn: answered(page, n), 60, f"turn {turn} answered in both columns")
            now = stats(page)
            for column, (_, prompt, cached) in now.items():
                if turn > 1:
                    before_answer, before_prompt, _ = seen[column]
                    assert prompt > before_prompt + before_answer, (column, turn, seen[column], now[column])
                    assert cached >= before_prompt - 1, (column, turn, seen[column], now[column])
            seen = now
        base_turns, tuned_turns = messages(page, "chat-base"), messages(page, "chat-adapter")
        assert len(base_turns) == len(tuned_turns) == 6
        assert base_turns[::2] == tuned_turns[::2]  # the same user turns in both columns
        assert base_turns[1::2] != tuned_turns[1::2]  # answered by different models
        worker_pid = int(re.search(r"pid (\d+)", page.locator("#chat-status").inner_text())[1])

        # Stop ends a long answer: a few hundred tokens at most of the 4,096 asked for.
        set_number(page, "max-tokens", "4096")
        send(page, "tell me a long story .")
        wait_until(lambda: len(messages(page, "chat-base")) == 8 and len(messages(page, "chat-base")[-1]) > 20, 30,
                   "the long answer started")
        page.locator("#chat-stop").click()
        wait_until(lambda: "stopped" in page.locator("#chat-status").inner_text(), 30, "the answer stopped")
        wait_until(lambda: "⏹" in messages(page, "chat-adapter")[-1], 30, "the adapter's answer skipped")
        stopped_at = int(re.search(r"Base: (\d+) tokens", page.locator("#chat-status").inner_text())[1])
        assert 0 < stopped_at < 4096

        # Training always wins: starting a run ends the worker, and the chat says why.
        fill_model = page.locator("#model-path textarea")
        page.get_by_role("tab", name="1 · Model").click()
        fill_model.fill(str(tiny_model))
        page.get_by_role("tab", name="3 · Data").click()
        page.locator("#data-path textarea").fill(str(chat_data))
        page.get_by_role("tab", name="4 · Train").click()
        set_number(page, "iters", "4")
        page.locator("#start").click()
        page.locator("#train-message").get_by_text("Started").wait_for(timeout=30_000)
        wait_until(lambda: not pid_alive(worker_pid), 30, "the chat's worker ended")
        page.get_by_role("tab", name="5 · Test").click()
        page.locator("#chat-status").get_by_text(re.compile("paused: training run")).wait_for(timeout=30_000)
        wait_until(lambda: not runs.active_run(runs_dir), 120, "the run ended")
        page.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped by the app) counts as ended
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    except OSError:
        return True
