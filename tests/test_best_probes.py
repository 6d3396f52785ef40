"""Best checkpoint, early stopping, sample probes, and configs that mlx_lm.lora reads too (issue 10)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import yaml
from tiny import sentences, write_jsonl

from lora_app import runs
from lora_app.config import RunConfig, to_mlx_lm_yaml_dict


def events(run_dir, kind):
    return [e for e in runs.read_events(run_dir) if e["event"] == kind]


@pytest.fixture(scope="module")
def plateau_data(tmp_path_factory):
    """Training rows from the tiny grammar; validation rows of shuffled words, which training cannot fit:
    the validation loss falls at first (word frequencies), then stops improving."""
    folder = tmp_path_factory.mktemp("plateau")
    write_jsonl(folder / "train.jsonl", [{"text": s} for s in sentences(64, seed=1)])
    rng = random.Random(5)
    valid = []
    for s in sentences(16, seed=2):
        words = s.split()
        rng.shuffle(words)
        valid.append({"text": " ".join(words)})
    write_jsonl(folder / "valid.jsonl", valid)
    return folder


@pytest.mark.slow
def test_best_checkpoint_and_early_stopping(tiny_model, plateau_data, engine_env, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_app", "train", "--model", str(tiny_model), "--data", str(plateau_data),
           "--out", str(out), "--iters", "400", "--learning-rate", "3e-3", "--steps-per-eval", "5",
           "--early-stop-patience", "3", "--early-stop-min-delta", "0.01", "--save-every", "1000",
           "--probe-prompts", "the big cat,the red dog", "--probe-max-tokens", "6"]
    result = subprocess.run(cmd, env=engine_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    vals = [(e["step"], e["val_loss"]) for e in events(out, "val")]
    stopped = events(out, "stopped")
    assert stopped and "early stopping" in stopped[0]["reason"], stopped
    last_step = stopped[0]["step"]
    assert last_step < 400 and vals[-1][0] == last_step
    best_step, best_loss = min(vals, key=lambda v: v[1])
    # The stop came exactly `patience` evaluations after the best one (no improvement of 0.01 since).
    assert [s for s, _ in vals].index(last_step) - [s for s, _ in vals].index(best_step) == 3
    best = json.loads((out / "best" / "adapter_config.json").read_text())
    assert best["step"] == best_step and best["val_loss"] == pytest.approx(best_loss)
    latest = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert latest["step"] == last_step
    # Sample probes: the base model's answer at step 0, then one per evaluation and prompt.
    samples = events(out, "sample")
    assert [s["step"] for s in samples[:2]] == [0, 0]
    assert len(samples) == 2 * (1 + len(vals))
    assert {s["prompt"] for s in samples} == {"the big cat", "the red dog"}
    assert all(isinstance(s["answer"], str) for s in samples)
    assert runs.run_state(out).best_step == best_step


@pytest.mark.slow
def test_yaml_round_trip_through_mlx_lm_lora(tiny_model, text_data, engine_env, tmp_path):
    flat = {"model": str(tiny_model), "data": str(text_data), "rank": 4, "alpha": 12.0, "layers": "last:1",
            "modules": ["q_proj", "down_proj"], "iters": 3, "batch_size": 2, "learning_rate": 1e-3,
            "warmup": 1, "steps_per_eval": 100, "save_every": 100, "weight_decay": 0.05}
    config = RunConfig.from_flat(flat)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_mlx_lm_yaml_dict(config)))
    # Our own CLI reads it back to the same settings.
    assert RunConfig.from_flat(yaml.safe_load(path.read_text())).to_flat() == config.to_flat()
    ours = subprocess.run([sys.executable, "-m", "lora_app", "train", "--config", str(path), "--out",
                           str(tmp_path / "ours")], env=engine_env, capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0, ours.stderr[-2000:]
    # Unmodified mlx-lm runs the same file.
    theirs = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--config", str(path), "--adapter-path",
                             str(tmp_path / "theirs")], env=engine_env, capture_output=True, text=True, timeout=300)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    a = json.loads((tmp_path / "ours" / "adapters" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert a["num_layers"] == b["num_layers"] == 1
    assert a["lora_parameters"]["rank"] == b["lora_parameters"]["rank"] == 4
    assert a["lora_parameters"]["scale"] == b["lora_parameters"]["scale"] == 3.0
    assert sorted(a["lora_parameters"]["keys"]) == sorted(b["lora_parameters"]["keys"])
    # mlx-lm trains with the optimizer arguments it saved: our AdamW's weight decay, not mlx's default of 0.01
    assert b["optimizer"] == "adamw" and b["optimizer_config"]["adamw"] == {"weight_decay": 0.05}
