"""The training process end to end through the CLI, checked by mlx-lm's own tools."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lora_app import runs

TRAIN = [sys.executable, "-m", "lora_app", "train"]


def train(env, model, data, out, *flags, check=True):
    cmd = [*TRAIN, "--model", str(model), "--data", str(data), "--out", str(out), *map(str, flags)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def events(run_dir, kind):
    return [e for e in runs.read_events(run_dir) if e["event"] == kind]


@pytest.fixture(scope="module")
def trained_run(tiny_model, text_data, engine_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r1"
    train(engine_env, tiny_model, text_data, out, "--iters", 30, "--learning-rate", "2e-3", "--steps-per-report", 5,
          "--steps-per-eval", 10, "--save-every", 10, "--batch-size", 4, "--rank", 8, "--alpha", 16)
    return out


def test_validation_loss_falls(trained_run):
    val = [e["val_loss"] for e in events(trained_run, "val")]
    assert len(val) == 3 and val[-1] < val[0] - 0.3, val
    train_reports = events(trained_run, "train")
    assert [e["step"] for e in train_reports] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "trained_tokens", "peak_memory_gb"):
        assert all(key in e for e in train_reports)
    # step 1's own peak: the run's peak so far then, so no later report's is lower
    [first] = events(trained_run, "first_step")
    assert 0 < first["peak_memory_gb"] <= train_reports[0]["peak_memory_gb"]
    assert runs.run_state(trained_run).status == "done"
    assert [e["step"] for e in events(trained_run, "checkpoint")] == [10, 20, 30]


@pytest.mark.slow
def test_adapter_loads_in_mlx_lm_generate(trained_run, tiny_model, engine_env):
    config = json.loads((trained_run / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 8, "scale": 2.0, "dropout": 0.0,
                                         "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    cmd = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_model), "--adapter-path",
           str(trained_run / "adapters"), "--prompt", "the big cat", "--max-tokens", "8", "--temp", "0"]
    theirs = subprocess.run(cmd, env=engine_env, capture_output=True, text=True, timeout=120)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    ours = subprocess.run([sys.executable, "-m", "lora_app", "generate", "--model", str(tiny_model), "--adapter",
                           str(trained_run / "adapters"), "--prompt", "the big cat", "--max-tokens", "8"],
                          env=engine_env, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr[-2000:]
    # Same weights, same chat template, greedy: the same text.
    answer = theirs.stdout.split("==========")[1].strip()
    assert answer and ours.stdout.strip() == answer


@pytest.mark.slow
def test_mlx_lm_lora_adapter_loads_in_ours(tiny_model, text_data, engine_env, tmp_path):
    adapter = tmp_path / "theirs"
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_model), "--train", "--data", str(text_data),
           "--iters", "4", "--batch-size", "2", "--num-layers", "1", "--adapter-path", str(adapter),
           "--steps-per-eval", "100", "--learning-rate", "1e-2"]
    result = subprocess.run(cmd, env=engine_env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    from lora_app.adapters import load_adapter
    from lora_app.models import load_model

    model, _ = load_model(str(tiny_model))
    lora, targets = load_adapter(model, adapter)
    assert targets.blocks == [1] and lora.rank == 8 and lora.alpha == pytest.approx(20.0 * 8)
    import mlx.core as mx
    from mlx_lm import load

    theirs_model, _ = load(str(tiny_model), adapter_path=str(adapter))
    x = mx.array([[5, 17, 42, 99]])
    assert np.allclose(np.array(model(x)), np.array(theirs_model(x)), atol=1e-5)


@pytest.mark.slow
def test_sigint_leaves_loadable_adapter_and_stopped_event(tiny_model, text_data, engine_env, tmp_path):
    out = tmp_path / "run"
    cmd = [*TRAIN, "--model", str(tiny_model), "--data", str(text_data), "--out", str(out), "--iters", "100000",
           "--steps-per-report", "5", "--save-every", "100000"]
    proc = subprocess.Popen(cmd, env=engine_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (out.exists() and events(out, "train")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    stopped = events(out, "stopped")
    assert stopped and stopped[0]["step"] > 0
    assert runs.run_state(out).status == "stopped"
    from lora_app.adapters import load_adapter
    from lora_app.models import load_model

    load_adapter(load_model(str(tiny_model))[0], out / "adapters")


@pytest.mark.slow
def test_chat_training_with_masking_end_to_end(tiny_model, chat_data, engine_env, tmp_path):
    out = tmp_path / "chat"
    train(engine_env, tiny_model, chat_data, out, "--iters", 12, "--mask-prompt", "--steps-per-eval", 6,
          "--learning-rate", "2e-3", "--batch-size", 4)
    infos = " ".join(e["message"] for e in events(out, "info"))
    assert "detected format: chat" in infos
    val = [e["val_loss"] for e in events(out, "val")]
    assert len(val) == 2 and val[-1] < val[0]
    # The validation loss is over the same masked tokens: recompute it in-process with the saved adapter.
    from lora_app.adapters import load_adapter
    from lora_app.batching import eval_batches
    from lora_app.config import DataConfig
    from lora_app.data import load_data
    from lora_app.models import load_model
    from lora_app.objective import evaluate

    model, tok = load_model(str(tiny_model))
    load_adapter(model, out / "adapters")
    model.eval()
    data = load_data(DataConfig(data=str(chat_data), mask_prompt=True), tok, batch_size=4)
    assert all(sum(w) < len(t) - 10 for t, w in data.valid)  # masked: most tokens carry no loss
    assert evaluate(model, eval_batches(data.valid, 4, 2048)) == pytest.approx(val[-1], rel=1e-4)


def test_openblas_and_reference_blas_give_the_same_losses(tiny_model, text_data, engine_env, tmp_path):
    if "libopenblas" not in engine_env.get("LD_PRELOAD", ""):
        pytest.skip("OpenBLAS is not installed here (apt-get install libopenblas0-pthread)")
    flags = ("--iters", 6, "--steps-per-report", 1, "--learning-rate", "2e-3")
    train(engine_env, tiny_model, text_data, tmp_path / "fast", *flags)
    plain = {k: v for k, v in engine_env.items() if k != "LD_PRELOAD"} | {"LORA_APP_NO_OPENBLAS": "1"}
    train(plain, tiny_model, text_data, tmp_path / "plain", *flags)
    fast = [e["loss"] for e in events(tmp_path / "fast", "train")]
    ref = [e["loss"] for e in events(tmp_path / "plain", "train")]
    assert len(fast) == 6 and np.allclose(fast, ref, rtol=1e-4), (fast, ref)


@pytest.mark.parametrize("flags,message", [
    (["--model", "/nonexistent/model"], "model folder not found: /nonexistent/model"),
    (["--data", "/nonexistent/data"], "/nonexistent/data"),
    (["--rank", "0"], "rank must be at least 1 (got 0)"),
    (["--alpha", "0"], "alpha must be greater than 0"),
    (["--modules", "q_proj,qkv"], "module 'qkv' not found in the model's blocks; it has: down_proj, gate_proj"),
    (["--layers", "0-5"], "block(s) [2, 3, 4, 5] outside the model, which has blocks 0-1"),
    (["--learning-rate", "fast"], "learning_rate: expected float, got 'fast'"),
])
def test_bad_cli_input_is_one_clear_line(flags, message, tiny_model, text_data, engine_env, tmp_path):
    base = {"--model": str(tiny_model), "--data": str(text_data)}
    given = dict(zip(flags[::2], flags[1::2]))
    args = [x for k, v in {**base, **given}.items() for x in (k, v)]
    result = subprocess.run([*TRAIN, *args, "--out", str(tmp_path / "r"), "--iters", "2"], env=engine_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3


def test_existing_run_folder_is_never_overwritten(trained_run, tiny_model, text_data, engine_env):
    before = (trained_run / "events.jsonl").read_bytes()
    result = train(engine_env, tiny_model, text_data, trained_run, "--iters", 2, check=False)
    assert result.returncode == 2 and "already exists; use --resume" in result.stderr
    assert (trained_run / "events.jsonl").read_bytes() == before


@pytest.mark.slow
def test_non_contiguous_blocks_load_in_mlx_lm(tiny_model, text_data, engine_env, tmp_path):
    out = tmp_path / "r"
    train(engine_env, tiny_model, text_data, out, "--iters", 3, "--layers", "0", "--modules", "q_proj,down_proj",
          "--learning-rate", "1e-2")
    config = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    cmd = [sys.executable, "-c", "import sys, mlx.core as mx; from mlx_lm import load; "
           "m, _ = load(sys.argv[1], adapter_path=sys.argv[2]); "
           "print(sorted(k for k, _ in __import__('mlx.utils').utils.tree_flatten(m.parameters()) if 'lora' in k))",
           str(tiny_model), str(out / "adapters")]
    result = subprocess.run(cmd, env=engine_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.mlp.down_proj.lora_a" in result.stdout and "layers.1" not in result.stdout


def test_runs_listing(trained_run):
    listed = runs.list_runs(Path(trained_run).parent)
    assert any(s.name == trained_run.name and s.status == "done" and s.step == 30 for s in listed)
