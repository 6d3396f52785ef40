"""Full fine-tuning (issue 28): --method full trains the chosen blocks' modules themselves; the run's model/ folder
loads in mlx_lm.load alone and gives the logits of our model (the base with the run's adapters/ weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_export import cli, load, mlx_logits

from lora_app.config import ConfigError, RunConfig


def test_full_fine_tuning_saves_a_model_folder_mlx_lm_loads(tiny_model: Path, text_data: Path, engine_env: dict,
                                                            tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    run = tmp_path / "run"
    done = cli(["train", "--model", str(tiny_model), "--data", str(text_data), "--out", str(run), "--iters", "4",
                "--method", "full", "--learning-rate", "1e-3", "--batch-size", "2", "--layers", "1", "--modules",
                "q_proj,down_proj", "--steps-per-eval", "0", "--save-every", "4"], engine_env)
    assert done.returncode == 0, done.stderr
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "full"
    trained = mx.load(str(run / "adapters" / "adapters.safetensors"))
    assert sorted(trained) == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    theirs, _ = mlx_lm_load(str(run / "model"))
    ours = load(tiny_model, run / "adapters")
    assert np.array_equal(mlx_logits(theirs), mlx_logits(ours))
    base = mlx_logits(load(tiny_model))
    assert np.abs(base - mlx_logits(ours)).max() > 1e-3  # trained: the weights moved
    info = [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == "info"]
    trainable = next(e["trainable_params"] for e in info if "trainable_params" in e)
    assert trainable == 64 * 64 + 64 * 128  # every weight of q_proj [64, 64] and down_proj [64, 128] of block 1


def test_dpo_with_full_fine_tuning_is_refused() -> None:
    with pytest.raises(ConfigError, match="objective dpo compares with the base model"):
        RunConfig.from_flat({"method": "full", "objective": "dpo"})
