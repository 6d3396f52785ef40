"""The Test step's logic (lora_app/ui/test_step.py) without a browser: the adapter list from the start, what a column
sends to the worker, the sampling bounds, the template notice and the snippets."""

from __future__ import annotations

import json
import shlex
import shutil

from lora_app.ui import test_step


def test_adapter_list_holds_every_runs_adapters_from_the_start(tmp_path, tiny_adapter):
    """It was empty until ↻ was pressed: the page is built with it filled (and a finished run refreshes it)."""
    from lora_app.ui.blocks import build_app

    runs_dir = tmp_path / "runs"
    for name, kinds in (("first", ("adapters", "best")), ("second", ("adapters",))):
        for kind in kinds:
            shutil.copytree(tiny_adapter, runs_dir / name / kind)
        (runs_dir / name / "config.json").write_text("{}")
    demo = build_app(runs_dir)
    dropdown = next(c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "test-adapter")
    folders = sorted(folder for _, folder in dropdown["props"]["choices"])
    assert folders == sorted(str(runs_dir / n / k) for n, k in
                             (("first", "adapters"), ("first", "best"), ("second", "adapters")))


def test_each_column_sends_its_own_turns():
    chat = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},  # as gradio gives messages back
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "⚠️ the worker ended"},  # a failed answer is not part of the chat
            {"role": "user", "content": "third"},
            {"role": "assistant", "content": "as far as it got ⏹"},  # stopped: what was shown
            {"role": "user", "content": "fourth"},
            {"role": "assistant", "content": "⏹ stopped"}]  # Stop before this column answered
    assert test_step.conversation("  Be brief. ", chat) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
        {"role": "user", "content": "third"}, {"role": "assistant", "content": "as far as it got"},
        {"role": "user", "content": "fourth"}]
    assert test_step.conversation("", chat[:1]) == [{"role": "user", "content": "hi"}]


def test_sampling_settings_are_bounded():
    assert test_step.sampling(0.7, 0.9, 64, 3) == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 3}
    wild = test_step.sampling(99, 0, 10**9, -1)
    assert wild == {"temperature": 2.0, "top_p": 0.01, "max_tokens": test_step.MAX_TOKENS, "seed": 0}
    assert test_step.sampling(0, 1, 1, 2**40)["seed"] == 2**31 - 1
    assert test_step.sampling(None, None, None, None)["max_tokens"] == 256


def test_template_notice_and_snippets(tiny_model, tmp_path):
    assert "own chat template" in test_step.template_notice(str(tiny_model))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert "no chat template" in test_step.template_notice(str(bare))
    assert test_step.template_notice("org/not-here") == ""

    shell, python = test_step.snippets("demo", "/runs/my run/adapters")
    serve_line = next(line for line in shell.splitlines() if line.startswith("python -m lora_app serve"))
    assert shlex.split(serve_line)[4:] == ["--model", "demo", "--adapter", "/runs/my run/adapters", "--port", "8080"]
    assert "model='my run'" in python and 'base_url="http://127.0.0.1:8080/v1"' in python
    compile(python, "snippet", "exec")
    assert "model='base'" in test_step.snippets("demo", None)[1]


def test_a_worker_that_cannot_start_is_one_line_in_both_columns(tiny_model, tmp_path, monkeypatch):
    """A bad adapter folder: serve's own one-line error, in both columns, from one attempt to start the worker."""
    from lora_app.ui.chat_worker import Workers
    from lora_app.ui.context import Context

    workers = Workers()
    monkeypatch.setattr(test_step, "WORKERS", workers)
    missing = tmp_path / "no-adapter"
    *_, (base, tuned, _, status) = test_step.send(Context(tmp_path / "runs"), str(tiny_model), str(missing), "own",
                                                  "", 0, 1, 8, 0, "hi", [], [])
    assert base[-1]["content"] == tuned[-1]["content"] == f"⚠️ adapter folder not found: {missing}"
    assert [m["role"] for m in base] == ["user", "assistant"] and workers.worker is None
    assert "error: adapter folder not found" in status
