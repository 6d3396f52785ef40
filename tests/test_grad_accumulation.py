"""Gradient accumulation (TrainConfig.grad_accumulation; mlx-lm's grad_accumulation_steps): a step of k batches
makes the update of one batch k times as large, at one batch's activations; the loop gives step s the batches
s*k ... s*k+k-1; mlx-lm's files count iterations in batches."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lora_app import runs
from lora_app.config import ConfigError, LoraConfig, RunConfig, to_mlx_lm_yaml_dict
from lora_app.lora import apply_lora
from lora_app.models import load_model
from lora_app.objective import CrossEntropy
from lora_app.trainer import accumulating_step, training_step


def one_update(model_path, make_step, args):
    """(loss, tokens, grad norm, LoRA parameters) after one SGD step: SGD, as Adam's first step hides the scale."""
    model, _ = load_model(str(model_path))
    apply_lora(model, LoraConfig(rank=4, modules=["q_proj", "v_proj"]), seed=0)
    opt = optim.SGD(learning_rate=0.5)
    opt.init(model.trainable_parameters())
    step, state = make_step(model, opt, CrossEntropy(None))
    model.train()
    loss, ntoks, stats = step(*args)
    mx.eval(loss, ntoks, stats, state)
    return loss.item(), ntoks.item(), stats[0].item(), {k: np.array(v) for k, v in
                                                        tree_flatten(model.trainable_parameters())}


def test_two_batches_accumulated_update_as_one_twice_as_large(tiny_model) -> None:
    tokens = mx.random.randint(3, 200, (4, 33), key=mx.random.key(1))
    weights = mx.ones((4, 32))  # equal tokens a batch: the mean of the two means is the mean of all four rows
    loss, ntoks, norm, whole = one_update(tiny_model, training_step, (tokens, weights))
    halves = [(tokens[:2], weights[:2]), (tokens[2:], weights[2:])]
    acc_loss, acc_ntoks, acc_norm, accumulated = one_update(tiny_model, accumulating_step, halves)
    assert (acc_loss, acc_ntoks, acc_norm) == pytest.approx((loss, ntoks, norm), rel=1e-4)
    for name, value in whole.items():
        np.testing.assert_allclose(accumulated[name], value, rtol=1e-3, atol=1e-6, err_msg=name)
    assert any(not np.allclose(v, 0) for k, v in whole.items() if "lora_b" in k)  # the step did update B


def train(engine_env, model, data, out, *flags):
    cmd = [sys.executable, "-m", "lora_app", "train", "--model", str(model), "--data", str(data), "--out", str(out),
           "--batch-size", "2", "--batching", "padded", "--steps-per-eval", "0", "--save-every", "100",
           *map(str, flags)]
    result = subprocess.run(cmd, env=engine_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return runs.read_events(out)


def test_a_step_trains_the_next_k_batches(tiny_model, engine_env, tmp_path) -> None:
    """3 steps of 2 batches train the tokens of 6 steps of one batch (rows of many lengths, so batches differ in
    tokens), and an epoch takes half the steps."""
    import tiny

    data = tmp_path / "data"
    data.mkdir()
    tiny.write_jsonl(data / "train.jsonl", [{"text": " ".join(tiny.sentences(1 + i, seed=i))} for i in range(24)])
    one = train(engine_env, tiny_model, data, tmp_path / "one", "--iters", 6, "--steps-per-report", 6)
    two = train(engine_env, tiny_model, data, tmp_path / "two", "--iters", 3, "--steps-per-report", 3,
                "--grad-accumulation", 2)
    trained = [next(e["trained_tokens"] for e in ev if e["event"] == "train") for ev in (one, two)]
    assert trained[0] == trained[1] > 0
    per_epoch = [next(e["steps_per_epoch"] for e in ev if "steps_per_epoch" in e) for ev in (one, two)]
    assert per_epoch[1] == -(-per_epoch[0] // 2)


def test_mlx_lm_counts_batches() -> None:
    """mlx-lm's iterations, reports, evaluations and saves count batches; ours count steps of k batches."""
    flat = {"grad_accumulation_steps": 4, "iters": 1000, "steps_per_report": 10, "steps_per_eval": 0,
            "save_every": 100, "batch_size": 1}
    cfg = RunConfig.from_flat(flat)
    t = cfg.train
    assert (t.grad_accumulation, t.iters, t.steps_per_report, t.steps_per_eval, t.save_every) == (4, 250, 3, 0, 25)
    written = to_mlx_lm_yaml_dict(cfg)
    assert (written["grad_accumulation_steps"], written["iters"], written["save_every"]) == (4, 1000, 100)
    assert RunConfig.from_flat(written).train.iters == 250
    with pytest.raises(ConfigError, match="^grad_accumulation_steps: 0: must be at least 1"):
        RunConfig.from_flat({"grad_accumulation_steps": 0})


def test_a_resumed_run_continues_with_the_next_batches(tiny_model, text_data, engine_env, tmp_path) -> None:
    """4 steps of 2 batches in one go, and 2 steps resumed to 4: the same losses at steps 3 and 4."""
    flags = ("--steps-per-report", 1, "--grad-accumulation", 2, "--lr-schedule", "constant", "--learning-rate", 1e-2)
    whole = train(engine_env, tiny_model, text_data, tmp_path / "whole", "--iters", 4, *flags)
    train(engine_env, tiny_model, text_data, tmp_path / "parts", "--iters", 2, *flags)
    resumed = subprocess.run([sys.executable, "-m", "lora_app", "train", "--resume", str(tmp_path / "parts"),
                              "--iters", "4"], env=engine_env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = [{e["step"]: e["loss"] for e in ev if e["event"] == "train"}
              for ev in (whole, runs.read_events(tmp_path / "parts"))]
    assert losses[1][3] == pytest.approx(losses[0][3], abs=1e-6)
    assert losses[1][4] == pytest.approx(losses[0][4], abs=1e-6)
    assert losses[0][3] != pytest.approx(losses[0][4], abs=1e-6)  # steps of other batches
