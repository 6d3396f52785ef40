"""Continue training an existing adapter (init_adapter / --init-adapter / mlx-lm's resume_adapter_file): the run
starts exactly at the adapter's weights, mismatches fail before training with one line, the YAML maps both ways."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from runhelp import cli

from lora_app import runs
from lora_app.config import RunConfig, to_mlx_lm_yaml_dict

# Small, fast runs; A and B share data, batch size and sequence length, so their validation batches are the same.
FLAGS = ["--batch-size", "2", "--max-seq-length", "64", "--learning-rate", "2e-3", "--steps-per-report", "2",
         "--val-batches", "4", "--seed", "3"]
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def train(env: dict, model: Path, data: Path, out: Path, *flags: object) -> subprocess.CompletedProcess:
    return cli(["train", "--model", str(model), "--data", str(data), "--out", str(out), *FLAGS, *map(str, flags)],
               env, timeout=300)


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in runs.read_events(run_dir) if e["event"] == kind]


@pytest.fixture(scope="module")
def run_a(tiny_model, text_data, engine_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init") / "a"
    result = train(engine_env, tiny_model, text_data, out, "--iters", 8, "--steps-per-eval", 4)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def mlx_lm_adapter(tiny_model, text_data, engine_env, tmp_path_factory) -> Path:
    """An adapter made by unmodified mlx_lm.lora: the last block, every linear module (no keys), scale 20."""
    adapter = tmp_path_factory.mktemp("theirs") / "adapter"
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_model), "--train", "--data", str(text_data),
           "--iters", "4", "--batch-size", "2", "--num-layers", "1", "--adapter-path", str(adapter),
           "--steps-per-eval", "100", "--learning-rate", "1e-2"]
    result = subprocess.run(cmd, env=engine_env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return adapter


def tensors(path: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


# ---- (a) a run started from an adapter begins exactly where that adapter ended -------------------------------

@pytest.mark.slow
def test_run_starts_at_the_adapters_validation_loss(run_a, tiny_model, text_data, engine_env, tmp_path):
    out = tmp_path / "b"
    # The weights file's path works as well as the folder.
    result = train(engine_env, tiny_model, text_data, out, "--iters", 2, "--steps-per-eval", 2,
                   "--init-adapter", run_a / "adapters" / "adapters.safetensors")
    assert result.returncode == 0, result.stderr[-2000:]
    a_val, b_val = events(run_a, "val"), events(out, "val")
    assert [e["step"] for e in b_val] == [0, 2]
    print(f"\nA's final validation loss {a_val[-1]['val_loss']:.6f}, B's at step 0 {b_val[0]['val_loss']:.6f}")
    assert b_val[0]["val_loss"] == pytest.approx(a_val[-1]["val_loss"], abs=1e-4)
    assert b_val[0]["val_loss"] < a_val[0]["val_loss"]  # lower than A's after 4 steps: B is not fresh
    started = [e for e in events(out, "info") if e.get("init_adapter")]
    assert started and started[0]["init_adapter"] == str(run_a / "adapters")
    assert not events(out, "warning")
    assert json.loads((out / "config.json").read_text())["init_adapter"].endswith("adapters.safetensors")

    # Resuming B from its own checkpoint: the checkpoint wins; the adapter is not loaded again.
    resumed = cli(["train", "--resume", str(out), "--iters", "4"], engine_env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len([e for e in events(out, "info") if e.get("init_adapter")]) == 1
    assert [e["step"] for e in events(out, "val")] == [0, 2, 4]
    assert any("resumed from step_0000002" in e["message"] for e in events(out, "info"))


def test_init_loads_the_adapters_exact_weights(run_a, tiny_model):
    from lora_app.adapters import init_from_adapter
    from lora_app.config import LoraConfig
    from lora_app.lora import adapter_tensors, apply_lora
    from lora_app.models import load_model

    model, _ = load_model(str(tiny_model))
    lora = LoraConfig()  # A's: rank 8, alpha 16, q_proj and v_proj of every block
    targets = apply_lora(model, lora, seed=3)
    fresh = {k: np.array(v) for k, v in adapter_tensors(model).items()}
    folder, warnings = init_from_adapter(model, run_a / "adapters", lora, targets, str(tiny_model))
    assert folder == run_a / "adapters" and warnings == []
    loaded = {k: np.array(v) for k, v in adapter_tensors(model).items()}
    saved = tensors(run_a / "adapters" / "adapters.safetensors")
    assert sorted(loaded) == sorted(saved) == sorted(fresh)
    assert all(np.array_equal(loaded[k], saved[k]) for k in saved)
    assert not any(np.allclose(loaded[k], fresh[k]) for k in saved)  # lora_b starts at zero; A's is not


# ---- (b) adapters made by mlx_lm.lora ------------------------------------------------------------------------

def test_init_from_an_mlx_lm_lora_adapter(mlx_lm_adapter, tiny_model, text_data, engine_env, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    from lora_app.adapters import init_from_adapter
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.models import load_model

    lora = LoraConfig(rank=8, alpha=160.0, modules=ALL_LINEAR.split(","), layers="last:1")
    model, _ = load_model(str(tiny_model))
    targets = apply_lora(model, lora, seed=0)
    _, warnings = init_from_adapter(model, mlx_lm_adapter, lora, targets, str(tiny_model))
    assert warnings == []
    theirs, _ = load(str(tiny_model), adapter_path=str(mlx_lm_adapter))
    x = mx.array([[5, 17, 42, 99]])
    assert np.allclose(np.array(model(x)), np.array(theirs(x)), atol=1e-5)

    out = tmp_path / "continued"
    result = train(engine_env, tiny_model, text_data, out, "--iters", 2, "--steps-per-eval", 2, "--rank", 8,
                   "--alpha", 160, "--layers", "last:1", "--modules", ALL_LINEAR, "--init-adapter", mlx_lm_adapter)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [e["step"] for e in events(out, "val")] == [0, 2] and not events(out, "warning")


# ---- (c) a mismatch fails before training, in one line, and the run folder stays reusable ---------------------

@pytest.mark.slow
def test_rank_mismatch_is_one_clear_line_and_the_folder_is_reusable(run_a, tiny_model, text_data, engine_env,
                                                                       tmp_path):
    out = tmp_path / "r"
    result = train(engine_env, tiny_model, text_data, out, "--iters", 1, "--rank", 4,
                   "--init-adapter", run_a / "adapters")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: init_adapter {run_a / 'adapters'}: the adapter has rank 8 (this run: 4); set this "
                     "run's rank, modules and layers to the adapter's, or start without init_adapter"], lines
    assert not events(out, "train") and not (out / "adapters").exists()
    again = train(engine_env, tiny_model, text_data, out, "--iters", 1, "--init-adapter", run_a / "adapters")
    assert again.returncode == 0, again.stderr[-2000:]
    assert runs.run_state(out).status == "done"


def test_missing_adapter_folder_is_one_clear_line(tiny_model, text_data, engine_env, tmp_path):
    result = train(engine_env, tiny_model, text_data, tmp_path / "r", "--iters", 1,
                   "--init-adapter", tmp_path / "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: init_adapter: adapter folder not found: {tmp_path / 'nowhere'}"


@pytest.mark.parametrize("settings,message", [
    ({"modules": ["q_proj"]}, r"the adapter has modules self_attn\.q_proj, self_attn\.v_proj "
                              r"\(this run: self_attn\.q_proj\)"),
    ({"layers": "1"}, r"the adapter has blocks \[0, 1\] \(this run: \[1\]\)"),
    ({"rank": 4, "layers": "0"}, r"rank 8 \(this run: 4\); blocks \[0, 1\] \(this run: \[0\]\)"),
])
def test_targets_mismatch_names_what_differs(settings, message, run_a, tiny_model):
    from lora_app.adapters import AdapterError, init_from_adapter
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.models import load_model

    model, _ = load_model(str(tiny_model))
    lora = LoraConfig(**settings)
    targets = apply_lora(model, lora, seed=0)
    with pytest.raises(AdapterError, match=message):
        init_from_adapter(model, run_a / "adapters", lora, targets)


def test_adapter_of_another_base_model_is_refused(run_a, tmp_path):
    from tiny import build_tiny_model

    from lora_app.adapters import AdapterError, init_from_adapter
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.models import load_model

    other = build_tiny_model(tmp_path / "wide", hidden=96)
    model, _ = load_model(str(other))
    targets = apply_lora(model, LoraConfig(), seed=0)
    with pytest.raises(AdapterError) as caught:
        init_from_adapter(model, run_a / "adapters", LoraConfig(), targets, str(other))
    message = str(caught.value)
    assert "\n" not in message and "made for" in message and "adapter has shape" in message, message
    assert message.startswith(f"init_adapter {run_a / 'adapters'}: ")


def test_different_alpha_is_a_warning(run_a, tiny_model):
    from lora_app.adapters import init_from_adapter
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.models import load_model

    model, _ = load_model(str(tiny_model))
    lora = LoraConfig(alpha=8.0)
    _, warnings = init_from_adapter(model, run_a / "adapters", lora, apply_lora(model, lora, seed=0))
    assert len(warnings) == 1 and "scale 2 (alpha 16), this run uses 1 (alpha 8)" in warnings[0]


# ---- (d) mlx-lm's YAML key resume_adapter_file <-> init_adapter ------------------------------------------------

def test_yaml_maps_resume_adapter_file_both_ways(run_a, tiny_model, text_data, engine_env, tmp_path):
    folder = run_a / "adapters"
    config = RunConfig.from_flat({"model": str(tiny_model), "data": str(text_data), "init_adapter": str(folder),
                                  "iters": 1, "batch_size": 2, "steps_per_eval": 100, "max_seq_length": 64})
    written = to_mlx_lm_yaml_dict(config)
    assert written["resume_adapter_file"] == str(folder / "adapters.safetensors")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(written))
    back = RunConfig.from_flat(yaml.safe_load(path.read_text()))
    assert back.lora.init_adapter == str(folder / "adapters.safetensors")
    assert "resume_adapter_file" not in to_mlx_lm_yaml_dict(RunConfig())
    assert RunConfig.from_flat({"resume_adapter_file": None}).lora.init_adapter == ""
    # Unmodified mlx-lm runs the same file and loads the weights from it.
    theirs = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--config", str(path), "--adapter-path",
                             str(tmp_path / "theirs")], env=engine_env, capture_output=True, text=True, timeout=300)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    assert f"Loading fine-tuned weights from {folder / 'adapters.safetensors'}" in theirs.stdout


# ---- the UI: the form, the command preview, the Save step's "Continue training it" --------------------------

def test_form_and_command_preview_carry_init_adapter(run_a):
    from lora_app.__main__ import build_parser, run_config_from_args
    from lora_app.ui import settings

    values = settings.config_to_form(RunConfig())
    assert values["init_adapter"] == ""
    assert "--init-adapter" not in settings.command_preview(settings.form_to_config({**values, "model": "/m",
                                                                                      "data": "/d"}))
    values.update(model="/m", data="/d", init_adapter=f"  {run_a / 'adapters'} ")
    config = settings.form_to_config(values)
    assert config.lora.init_adapter == str(run_a / "adapters")
    command = settings.command_preview(config, out="runs/x")
    assert f"--init-adapter {shlex.quote(str(run_a / 'adapters'))}" in command
    assert run_config_from_args(build_parser().parse_args(shlex.split(command)[3:])) == config


def test_continue_training_button_fills_in_the_adapter(run_a, mlx_lm_adapter):
    from lora_app.ui.save_step import settings_from_adapter

    rank, alpha, dropout, modules, layers, model, init = settings_from_adapter(str(run_a / "adapters"))
    assert (rank, alpha, layers, init) == (8, 16.0, "0,1", str(run_a / "adapters"))
    assert modules["value"] == ["self_attn.q_proj", "self_attn.v_proj"]
    # mlx_lm.lora's default adapts every linear module: the inspected model's list fills the checkboxes.
    linear = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
              "self_attn.q_proj", "self_attn.v_proj"]
    *_, modules, layers, _, init = settings_from_adapter(str(mlx_lm_adapter), {"linear_modules": linear})
    assert modules["value"] == linear and layers == "last:1" and init == str(mlx_lm_adapter)


def test_init_from_a_peft_export(run_a, tiny_model, tmp_path):
    from lora_app.adapters import export_peft, init_from_adapter
    from lora_app.config import LoraConfig
    from lora_app.lora import adapter_tensors, apply_lora
    from lora_app.models import load_model

    peft = export_peft(run_a / "adapters", tmp_path / "peft", str(tiny_model))
    model, _ = load_model(str(tiny_model))
    lora = LoraConfig()
    init_from_adapter(model, peft, lora, apply_lora(model, lora, seed=0), str(tiny_model))
    saved = tensors(run_a / "adapters" / "adapters.safetensors")
    assert all(np.array_equal(np.array(v), saved[k]) for k, v in adapter_tensors(model).items())


def test_continue_training_button_reads_peft_folders(run_a, tiny_model, tmp_path):
    from lora_app.adapters import export_peft
    from lora_app.ui.save_step import settings_from_adapter

    peft = export_peft(run_a / "adapters", tmp_path / "peft", str(tiny_model))
    linear = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
              "self_attn.q_proj", "self_attn.v_proj"]
    rank, alpha, dropout, modules, layers, model, init = settings_from_adapter(str(peft), {"linear_modules": linear})
    ours = settings_from_adapter(str(run_a / "adapters"))
    assert (rank, alpha, dropout, modules["value"], model, init) == (
        ours[0], ours[1], ours[2], ours[3]["value"], str(tiny_model), str(peft))
    assert layers in ("all", ours[4])  # the tiny model has 2 blocks, both adapted
