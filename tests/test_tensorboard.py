"""--report-to tensorboard (issue 28): TensorBoard's own event reader finds the run's scalars in <run>/tensorboard."""

from __future__ import annotations

import pytest

from lora_app import runs


def test_tensorboard_reader_finds_the_runs_scalars(tiny_model, text_data, engine_env, tmp_path) -> None:
    from test_train_cli import train

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(engine_env, tiny_model, text_data, out, "--iters", 6, "--steps-per-report", 2, "--steps-per-eval", 3,
          "--batch-size", 2, "--max-seq-length", 64, "--report-to", "tensorboard")
    reader = EventAccumulator(str(out / "tensorboard"))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "valid/val_loss"} <= tags, tags
    reports = [e for e in runs.read_events(out) if e["event"] == "train"]
    for tag, name in (("train/loss", "loss"), ("train/grad_norm", "grad_norm"),
                      ("train/learning_rate", "learning_rate")):
        written = [(s.step, s.value) for s in reader.Scalars(tag)]
        assert written == [(e["step"], pytest.approx(e[name], rel=1e-6)) for e in reports], tag
