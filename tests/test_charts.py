"""Charts beyond loss (issue 28): learning rate and gradient norm for every run, reward margin and accuracy for
preference runs, in the live view's HTML and in Compare, read from events.jsonl."""

from __future__ import annotations

from lora_app import runs
from lora_app.ui import runs_step, timeline, train_step
from lora_app.ui.context import Context
from lora_app.ui.loss_plot import metric_points_in, points_in


def write_run(folder, preference: bool) -> None:
    folder.mkdir()
    (folder / "config.json").write_text('{"iters": 20}')
    for step in (10, 20):
        extra = {"reward_margin": step / 10, "reward_accuracy": 0.5 + step / 50} if preference else {}
        runs.append_event(folder, "train", step=step, loss=3.0 - step / 10, learning_rate=1e-3 / step,
                          grad_norm=2.0 / step, **extra)
        runs.append_event(folder, "val", step=step, val_loss=3.1 - step / 10,
                          **({"reward_margin": step / 5, "reward_accuracy": 0.6} if preference else {}))


def test_live_view_draws_each_metric_the_run_reports(tmp_path) -> None:
    ctx = Context(tmp_path, None)
    write_run(tmp_path / "sft", preference=False)
    write_run(tmp_path / "dpo", preference=True)
    sft = train_step.poll(ctx, "sft", None)
    assert sorted(points_in(sft[2])) == [(10, 2.0, "train"), (10, 2.1, "valid"), (20, 1.0, "train"),
                                         (20, 1.1, "valid")]
    drawn = metric_points_in(sft[2])
    assert drawn == {"learning_rate": [(10, 1e-4, "train"), (20, 5e-5, "train")],
                     "grad_norm": [(10, 0.2, "train"), (20, 0.1, "train")]}
    assert "**grad norm** 0.1" in sft[1] and "reward" not in sft[1]
    dpo = metric_points_in(train_step.poll(ctx, "dpo", None)[2])
    assert sorted(dpo) == sorted(timeline.METRICS)
    assert sorted(dpo["reward_margin"]) == [(10, 1.0, "train"), (10, 2.0, "valid"), (20, 2.0, "train"),
                                            (20, 4.0, "valid")]
    assert "**reward accuracy** 0.900 train · 0.600 valid" in train_step.poll(ctx, "dpo", None)[1]


def test_compare_overlays_a_chosen_metric(tmp_path) -> None:
    ctx = Context(tmp_path, None)
    write_run(tmp_path / "a", preference=True)
    write_run(tmp_path / "b", preference=True)
    _, _, frame = runs_step.compare(ctx, ["a", "b"], "step", False, 0.0, "grad_norm")
    assert sorted(set(frame["curve"])) == ["a train", "b train"] and list(frame["loss"]) == [0.2, 0.1, 0.2, 0.1]
    _, _, frame = runs_step.compare(ctx, ["a", "b"], "step", False, 0.0, "reward_accuracy")
    assert sorted(set(frame["curve"])) == ["a train", "a valid", "b train", "b valid"]
    _, _, frame = runs_step.compare(ctx, ["a", "b"], "step", False, 0.0)  # loss, as before
    assert list(frame[frame["curve"] == "a train"]["loss"]) == [2.0, 1.0]
