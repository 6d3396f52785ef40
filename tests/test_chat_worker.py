"""The Test step's model worker (lora_app/ui/chat_worker.py): one process kept loaded between messages, a follow-up
answered from the prompt cache, and released on a model switch, when idle, and when training starts; Stop ends an
answer mid-stream."""

from __future__ import annotations

import shutil
import time

import pytest
from runhelp import form_values
from test_ui_client import wait_until

from lora_app.ui import chat_worker
from lora_app.ui.chat_worker import WorkerKey, Workers

GREEDY = {"temperature": 0.0, "max_tokens": 8, "seed": 0}


def answer(workers: Workers, key: WorkerKey, messages: list[dict], model_id: str = "base", **settings):
    *_, last = workers.chat(key, model_id, messages, {**GREEDY, **settings})
    return last


def ended(proc) -> bool:
    return proc.poll() is not None


def test_worker_is_reused_then_released_on_model_switch_and_idle(tiny_model, tiny_adapter, tmp_path):
    workers = Workers(idle_s=60)
    key = WorkerKey(str(tiny_model), str(tiny_adapter))
    try:
        turn = [{"role": "user", "content": "the red cat sat on the mat ."}]
        first = answer(workers, key, turn)
        pid = workers.worker.pid
        follow_up = [*turn, {"role": "assistant", "content": first.text},
                     {"role": "user", "content": "the big dog ran under the log ."}]
        second = answer(workers, key, follow_up)
        assert workers.worker.pid == pid  # the same process, the model still loaded
        assert second.first_token_s < first.first_token_s / 3, (first.first_token_s, second.first_token_s)
        # The follow-up's prompt starts with the first turn, which the worker's prompt cache holds.
        assert second.usage["prompt_tokens"] > first.usage["prompt_tokens"]
        assert second.usage["prompt_tokens_details"]["cached_tokens"] >= first.usage["prompt_tokens"] - 1
        tuned = answer(workers, key, turn, "adapter")
        assert workers.worker.pid == pid and tuned.text != first.text  # the adapter, from the same process

        # Another model: the old worker ends now, not at the next message.
        old = workers.worker.proc
        other = tmp_path / "other-model"
        shutil.copytree(tiny_model, other)
        assert workers.release_unless(str(other))
        assert ended(old) and workers.worker is None and "model changed" in workers.status()
        answer(workers, WorkerKey(str(other)), turn)
        assert workers.worker.pid != pid

        # Idle: ended by the reaper thread after idle_s without a message.
        workers.idle_s = 0.5
        idle = workers.worker.proc
        wait_until(lambda: ended(idle), 15, "the idle worker ended")
        assert workers.worker is None and "idle" in workers.status()
    finally:
        workers.release("test over")


@pytest.mark.slow
def test_stop_ends_a_long_answer_and_training_releases_the_worker(tiny_model, chat_data, tmp_path, monkeypatch):
    """Stop closes the stream and the worker stops generating (the next message is answered at once); starting a
    run in the Train step ends the worker, and the chat says it is paused."""
    import threading

    from lora_app import runs
    from lora_app.ui import test_step, train_step
    from lora_app.ui.context import Context

    workers = Workers(idle_s=60)
    monkeypatch.setattr(chat_worker, "WORKERS", workers)
    monkeypatch.setattr(train_step, "WORKERS", workers)
    monkeypatch.setattr(test_step, "WORKERS", workers)
    key = WorkerKey(str(tiny_model))
    turn = [{"role": "user", "content": "the red cat sat on the mat ."}]
    try:
        answer(workers, key, turn)  # started and loaded
        threading.Timer(1.0, workers.interrupt).start()
        started = time.monotonic()
        never_ends = {"max_tokens": 30_000, "logit_bias": {"2": -1000.0}}  # <|im_end|> (tiny.SPECIAL) never wins
        long = answer(workers, key, turn, **never_ends)
        assert long.stopped and long.finish_reason is None and time.monotonic() - started < 5
        assert 0 < long.chunks < 30_000
        quick = answer(workers, key, turn)
        assert quick.first_token_s < 1.0 and not quick.stopped  # the worker is not still generating the long one

        worker = workers.worker.proc
        ctx = Context(tmp_path / "runs")
        name, message = train_step.start(ctx, "chat-then-train", **form_values(
            model=str(tiny_model), data=str(chat_data), iters=2, batch_size=2, steps_per_eval=0))
        assert "Started" in message, message
        assert ended(worker) and workers.worker is None
        assert "training run chat-then-train" in workers.status()
        # While the run trains (its process is still starting), a message does not start the worker again.
        outputs = list(test_step.send(ctx, str(tiny_model), None, "own", "", 0, 1, 8, 0, "hi", [], []))
        assert "paused" in outputs[-1][-1] and workers.worker is None
        wait_until(lambda: not runs.active_run(ctx.runs_dir), 60, "the run ended")
    finally:
        workers.release("test over")
