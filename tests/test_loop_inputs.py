"""The training loop makes its input arrays a report window at a time (trainer.upload): it must still feed step k
the plan's batch k, across report windows, windows longer than the 64-step cap, and a resume mid-window."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lora_app import trainer as trainer_module
from lora_app.config import RunConfig
from lora_app.objective import CrossEntropy
from lora_app.runs import RunFolderReporter
from lora_app.session import Session, prepare


def trainer(model: Path, data: Path, run_dir: Path, **overrides: object) -> Session:
    cfg = RunConfig.from_flat({"model": str(model), "data": str(data), "batch_size": 2, "max_seq_length": 64,
                               "steps_per_eval": 0, "save_every": 10**6, **overrides})
    return prepare(run_dir, cfg, False, RunFolderReporter(run_dir))


def recorded_tokens(tr: Session, monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Run the loop, recording the tokens each step was given."""
    seen: list[np.ndarray] = []
    real = trainer_module.training_step

    def training_step(*args, **kwargs):
        step, state = real(*args, **kwargs)
        return (lambda tokens, *rest: (seen.append(np.array(tokens)), step(tokens, *rest))[1]), state

    monkeypatch.setattr(trainer_module, "training_step", training_step)
    tr.started = time.perf_counter()
    trainer_module.train(tr, CrossEntropy(tr.head), RunFolderReporter(tr.run_dir), trainer_module.Control(tr.run_dir))
    return seen


@pytest.mark.parametrize("iters, every", [(23, 10), (70, 66), (5, 1)])
def test_each_step_trains_on_its_batch_of_the_plan(tiny_model, text_data, tmp_path, iters, every,
                                                   monkeypatch) -> None:
    tr = trainer(tiny_model, text_data, tmp_path, iters=iters, steps_per_report=every)
    seen = recorded_tokens(tr, monkeypatch)
    assert len(seen) == iters
    for k, tokens in enumerate(seen):
        np.testing.assert_array_equal(tokens, tr.plan.batch_at(k).tokens, err_msg=f"step {k + 1}")


def test_a_loop_resumed_mid_window_continues_with_the_next_batch(tiny_model, text_data, tmp_path,
                                                                  monkeypatch) -> None:
    tr = trainer(tiny_model, text_data, tmp_path, iters=23, steps_per_report=10)
    tr.progress.step = 14  # as a resume from a checkpoint at step 14 leaves it
    seen = recorded_tokens(tr, monkeypatch)
    assert len(seen) == 9
    for k, tokens in enumerate(seen, start=14):
        np.testing.assert_array_equal(tokens, tr.plan.batch_at(k).tokens, err_msg=f"step {k + 1}")


def test_upload_stops_at_the_next_report_and_at_64_steps(tiny_model, text_data, tmp_path) -> None:
    tr = trainer(tiny_model, text_data, tmp_path, iters=200, steps_per_report=100)
    assert [len(trainer_module.upload(tr, first)) for first in (0, 64, 90, 100, 199)] == [64, 36, 10, 64, 1]
