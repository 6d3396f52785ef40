"""Crash safety: SIGKILL one training run at random moments (many during checkpoint saves: save_every 1), resume
it each time, and check after every kill that the run folder is whole; at the end the resumed run's losses equal
an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import mlx.core as mx
import pytest
from runhelp import final_status, finish, make_run, start, train_steps

from lora_app import runs
from lora_app.adapters import load_adapter
from lora_app.checkpoints import latest_checkpoint, load_checkpoint
from lora_app.models import load_model

KILLS = 22
FAULT_RUN = {"iters": 5000, "save_every": 1, "keep_checkpoints": 2, "lr_schedule": "constant"}


def running_count(run_dir: Path) -> int:
    return sum(1 for e in runs.read_events(run_dir) if e.get("status") == "running")


def saving(run_dir: Path) -> bool:
    """A checkpoint or adapter write is under way (its temporary file or folder exists)."""
    try:
        return any(n.startswith(".tmp-") for n in os.listdir(run_dir / "checkpoints"))
    except OSError:
        return False


def wait_until(condition, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)


def kill_at_random(run_dir: Path, proc, rng: random.Random) -> None:
    """Kill during start-up, at a random moment of training, or as soon as a checkpoint save is seen."""
    mode = rng.choice(["startup", "random", "random", "save", "save"])
    if mode == "startup":
        time.sleep(rng.uniform(0.3, 3.0))
    else:
        before = running_count(run_dir)
        wait_until(lambda: running_count(run_dir) > before, proc)
        time.sleep(rng.uniform(0.0, 0.3))
        if mode == "save":
            wait_until(lambda: saving(run_dir), proc, timeout=5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def check_events(run_dir: Path) -> None:
    """Every whole line parses; only a torn last line (no newline) may not."""
    data = (run_dir / "events.jsonl").read_bytes()
    lines = data.split(b"\n")
    for line in lines[:-1]:
        assert isinstance(json.loads(line), dict), line
    assert runs.read_events(run_dir), "no events"


def check_checkpoint_and_adapter(run_dir: Path, model_path: Path) -> int:
    """The newest checkpoint and adapters/ load and hold finite numbers; returns the checkpoint's step."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return 0
    adapters, optimizer, state = load_checkpoint(newest)
    assert state["step"] == int(newest.name.split("_")[1])
    assert all(mx.isfinite(v).all().item() for v in adapters.values())
    assert optimizer, "empty optimizer state"
    model, _ = load_model(str(model_path))
    load_adapter(model, run_dir / "adapters")
    assert state["step"] <= max(train_steps(run_dir), default=0)
    return state["step"]


def leftovers(run_dir: Path) -> set[str]:
    """Temporary files of an interrupted save: evidence the kill hit a checkpoint or adapter write."""
    return {f"{d}/{p.name}" for d in ("checkpoints", "adapters") if (run_dir / d).is_dir()
            for p in (run_dir / d).iterdir() if p.name.startswith(".")}


@pytest.mark.slow
def test_sigkill_at_random_moments(tiny_model, text_data, tmp_path) -> None:
    rng = random.Random(1234)
    run_dir = make_run(tmp_path / "run", tiny_model, text_data, **FAULT_RUN)
    survived = during_save = newest = 0
    seen: set[str] = set()
    for i in range(KILLS):
        kill_at_random(run_dir, start(run_dir, resume=i > 0), rng)
        assert final_status(run_dir) == "interrupted"
        check_events(run_dir)
        step = check_checkpoint_and_adapter(run_dir, tiny_model)
        assert step >= newest, "the newest checkpoint went backwards"
        newest, survived = step, survived + 1
        torn = leftovers(run_dir)
        during_save += bool(torn - seen)
        seen = torn
    total = max(train_steps(run_dir)) + 5
    assert finish(start(run_dir, resume=True, extra=["--iters", str(total)])) == 0
    assert final_status(run_dir) == "done"
    print(f"\nkills survived: {survived} ({during_save} left a save half-written); newest checkpoint before "
          f"the last resume: step {newest}; finished at step {total}")
    assert survived >= 20
    check_same_losses(run_dir, tiny_model, text_data, tmp_path, total)


def check_same_losses(run_dir: Path, model: Path, data: Path, tmp_path: Path, total: int) -> None:
    reference = make_run(tmp_path / "reference", model, data, **{**FAULT_RUN, "iters": total, "save_every": 1000})
    assert finish(start(reference)) == 0
    got, want = train_steps(run_dir), train_steps(reference)
    assert sorted(got) == sorted(want)
    diff = max(abs(got[s] - want[s]) for s in want)
    print(f"max loss difference to an uninterrupted run over {total} steps: {diff:.3g}")
    assert diff <= 1e-6


def test_event_after_a_torn_line_stays_whole(tmp_path) -> None:
    runs.append_event(tmp_path, "status", status="running")
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"event": "train", "st')  # what a power cut mid-write could leave
    runs.append_event(tmp_path, "status", status="starting")
    assert [e["status"] for e in runs.read_events(tmp_path)] == ["running", "starting"]


def test_temp_files_of_torn_writes_are_removed(tmp_path) -> None:
    from lora_app.fileio import atomic_write_text, remove_temp_files

    (tmp_path / ".adapters.x1.tmp.safetensors").write_bytes(b"")
    atomic_write_text(tmp_path / "keep.json", "{}")
    assert remove_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]
