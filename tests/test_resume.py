"""Exact resume: a run paused or killed at step k and resumed reports the same losses as one never interrupted."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from runhelp import final_status, finish, make_run, start, train_steps, wait_for_step

from lora_app import runs
from lora_app.checkpoints import checkpoint_dirs, latest_checkpoint, load_checkpoint, prune, save_checkpoint

TOL = 1e-6


@pytest.fixture(scope="module")
def reference(tiny_model: Path, text_data: Path, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one is compared with."""
    run_dir = make_run(tmp_path_factory.mktemp("ref") / "run", tiny_model, text_data)
    assert finish(start(run_dir)) == 0, (run_dir / "train.log").read_text()
    return run_dir


def assert_same_losses(run_dir: Path, reference: Path, after: int) -> None:
    got, want = train_steps(run_dir), train_steps(reference)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    diff = max(abs(got[s] - want[s]) for s in want if s > after)
    print(f"\nmax loss difference after step {after}: {diff:.3g}")
    assert diff <= TOL, {s: (got[s], want[s]) for s in want}


@pytest.mark.slow
def test_pause_and_resume_matches_uninterrupted(reference, tiny_model, text_data, tmp_path) -> None:
    run_dir = make_run(tmp_path / "run", tiny_model, text_data)
    proc = start(run_dir)
    wait_for_step(run_dir, proc, 5)
    runs.request(run_dir, "pause")
    assert finish(proc) == 0
    assert final_status(run_dir) == "paused"
    paused_at = [e for e in runs.read_events(run_dir) if e["event"] == "stopped"][-1]["step"]
    assert 5 <= paused_at < 12
    assert latest_checkpoint(run_dir).name == f"step_{paused_at:07d}"
    assert finish(start(run_dir, resume=True)) == 0
    assert final_status(run_dir) == "done"
    assert_same_losses(run_dir, reference, paused_at)


@pytest.mark.slow
def test_sigkill_and_resume_from_newest_checkpoint(reference, tiny_model, text_data, tmp_path) -> None:
    run_dir = make_run(tmp_path / "run", tiny_model, text_data)
    proc = start(run_dir)
    wait_for_step(run_dir, proc, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert final_status(run_dir) == "interrupted"
    newest = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert newest >= 4
    assert finish(start(run_dir, resume=True)) == 0
    assert final_status(run_dir) == "done"
    resumed = [e for e in runs.read_events(run_dir) if e["event"] == "info" and "resumed" in e["message"]]
    assert resumed[-1]["step"] == newest
    assert_same_losses(run_dir, reference, newest)


def test_resume_with_more_iters_extends_a_finished_run(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    assert finish(start(run_dir, resume=True, extra=["--iters", "16"])) == 0
    state = runs.run_state(run_dir)
    assert (state.status, state.step, state.total_steps) == ("done", 16, 16)
    assert sorted(train_steps(run_dir)) == list(range(1, 17))
    assert runs.read_config(run_dir)["iters"] == 16
    assert latest_checkpoint(run_dir).name == "step_0000016"
    assert load_checkpoint(latest_checkpoint(run_dir))[2]["step"] == 16


def test_keep_checkpoints_keeps_the_newest(reference) -> None:
    # save_every 4, keep 2, 12 steps: saves 4, 8, 12 and keeps the newest two.
    assert [p.name for p in checkpoint_dirs(reference)] == ["step_0000008", "step_0000012"]


def test_prune_never_deletes_the_newest_good_checkpoint(tmp_path) -> None:
    import mlx.core as mx

    weights = {"a": mx.ones((2, 2))}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, weights, {"m": mx.zeros((2,))}, {}, keep=5)
    torn = tmp_path / "checkpoints" / "step_0000009"  # a newer folder without state.json: not good
    torn.mkdir()
    prune(tmp_path, keep=0)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_0000003"]
    adapters, optimizer, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and adapters["a"].shape == (2, 2)


@pytest.mark.slow
def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(reference, tiny_model, text_data,
                                                                    tmp_path) -> None:
    run_dir = make_run(tmp_path / "run", tiny_model, text_data, keep_checkpoints=3)
    assert finish(start(run_dir)) == 0
    newest = latest_checkpoint(run_dir)
    (newest / "adapters.safetensors").write_bytes(b"\0" * 10)  # a disk fault, not a kill: no rename saves it
    shutil.rmtree(run_dir / "adapters")
    assert finish(start(run_dir, resume=True, extra=["--iters", "12"])) == 0
    warnings = [e["message"] for e in runs.read_events(run_dir) if e["event"] == "warning"]
    assert any(newest.name in w and "cannot be read" in w for w in warnings), warnings
    assert final_status(run_dir) == "done"
    assert_same_losses(run_dir, reference, 0)
