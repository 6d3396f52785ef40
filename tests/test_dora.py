"""DoRA (issue 28): an adapter our CLI trains with --method dora is mlx-lm's layout (fine_tune_type: dora), loads in
unmodified `mlx_lm.generate` with our greedy tokens, and exports to PEFT (use_dora, the magnitude vector) with
transformers + peft giving our logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_export import PEFT_TOL, cli, load, mlx_logits, peft_export, rel_err, torch_logits


@pytest.fixture(scope="module")
def dora_trained(tiny_model: Path, text_data: Path, engine_env: dict, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dora") / "run"
    done = cli(["train", "--model", str(tiny_model), "--data", str(text_data), "--out", str(run), "--iters", "6",
                "--method", "dora", "--learning-rate", "1e-2", "--batch-size", "2", "--layers", "1", "--modules",
                "q_proj,v_proj,down_proj", "--steps-per-eval", "0", "--save-every", "6"], engine_env)
    assert done.returncode == 0, done.stderr
    return run / "adapters"


def test_dora_adapter_is_mlx_lms_layout(dora_trained: Path, tiny_model: Path) -> None:
    import mlx.core as mx

    config = json.loads((dora_trained / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    weights = mx.load(str(dora_trained / "adapters.safetensors"))
    magnitude = weights["model.layers.1.self_attn.q_proj.m"]
    base = load(tiny_model).layers[1].self_attn.q_proj.weight
    assert magnitude.shape == (64,)
    assert not np.allclose(np.array(magnitude), np.linalg.norm(np.array(base), axis=1))  # trained


@pytest.mark.slow
def test_dora_adapter_loads_in_mlx_lm_generate(dora_trained: Path, tiny_model: Path, engine_env: dict) -> None:
    prompt = ["--prompt", "the big cat", "--max-tokens", "8"]
    theirs = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_model),
                             "--adapter-path", str(dora_trained), "--temp", "0", *prompt],
                            env=engine_env, capture_output=True, text=True, timeout=120)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    ours = subprocess.run([sys.executable, "-m", "lora_app", "generate", "--model", str(tiny_model), "--adapter",
                           str(dora_trained), *prompt], env=engine_env, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr[-2000:]
    answer = theirs.stdout.split("==========")[1].strip()
    assert answer and ours.stdout.strip() == answer


@pytest.mark.slow
def test_dora_peft_export_matches_transformers_peft(dora_trained: Path, tiny_model: Path, engine_env: dict,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "peft"
    config, tensors = peft_export(dora_trained, out, engine_env)
    assert config["use_dora"] is True
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape == (64,)
    ours = mlx_logits(load(tiny_model, dora_trained))
    theirs = torch_logits(tiny_model, out)
    assert rel_err(theirs, ours) < PEFT_TOL
    assert rel_err(torch_logits(tiny_model), ours) > 20 * PEFT_TOL  # the adapter matters
