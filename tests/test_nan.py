"""Bad numbers: a learning rate so large that the weights overflow stops the run with a clear error at the step
where the loss became NaN; the checkpoint and adapter left behind are good ones, and resuming with a lower
learning rate finishes the run."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from runhelp import final_status, finish, make_run, start, train_steps

from lora_app import runs
from lora_app.adapters import load_adapter
from lora_app.checkpoints import checkpoint_dirs, load_checkpoint
from lora_app.lora import adapter_tensors
from lora_app.models import load_model

# Step 1 runs at learning rate 0 (warm-up), step 2 at 2.5e37: the weights after step 2 overflow, so the loss of
# step 3 is NaN, and the checkpoint saved after step 2 would repeat it on resume.
EXPLODE = {"learning_rate": 1e38, "warmup": 4, "lr_schedule": "constant", "save_every": 1, "keep_checkpoints": 3,
           "iters": 10, "dropout": 0.0}


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model: Path, text_data: Path, tmp_path) -> None:
    run_dir = make_run(tmp_path / "run", tiny_model, text_data, **EXPLODE)
    assert finish(start(run_dir)) == 1
    state = runs.run_state(run_dir)
    assert state.status == "error"
    error = [e for e in runs.read_events(run_dir) if e["event"] == "error"][-1]
    assert error["step"] == 3
    assert "nan at step 3" in error["message"] and "Lower the learning rate" in error["message"]
    assert "step_0000001" in error["message"]
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_0000001"]
    weights, _, saved = load_checkpoint(checkpoint_dirs(run_dir)[-1])
    assert saved["step"] == 1 and all(mx.isfinite(v).all().item() for v in weights.values())
    assert_adapter_is(run_dir / "adapters", weights, tiny_model)


def assert_adapter_is(folder: Path, weights: dict, model_path: Path) -> None:
    """adapters/ holds the good checkpoint's weights (not the overflowing ones) and loads on a fresh model."""
    assert json.loads((folder / "adapter_config.json").read_text())["step"] == 1
    model, _ = load_model(str(model_path))
    load_adapter(model, folder)
    for name, value in adapter_tensors(model).items():
        assert mx.array_equal(value, weights[name]).item(), name


@pytest.mark.slow
def test_resume_with_a_lower_learning_rate_after_nan(tiny_model: Path, text_data: Path, tmp_path) -> None:
    run_dir = make_run(tmp_path / "run", tiny_model, text_data, **EXPLODE)
    assert finish(start(run_dir)) == 1
    assert finish(start(run_dir, resume=True, extra=["--learning-rate", "1e-3"])) == 0, run_dir.joinpath(
        "train.log").read_text()[-1500:]
    assert final_status(run_dir) == "done"
    assert runs.read_config(run_dir)["learning_rate"] == 1e-3
    losses = train_steps(run_dir)
    assert max(losses) == 10 and all(losses[s] < 10 for s in range(2, 11))
