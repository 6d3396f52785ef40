"""`python -m lora_app push`: the real huggingface_hub client uploads to tests/hubupload.py's fake hub (no
network), the model card is written from the run, and the listing after the upload is compared with the files."""

from __future__ import annotations

import functools
import io
import json
import subprocess
from pathlib import Path

import pytest
import runhelp
from hubupload import UploadHub

TOKEN = "hf_test_write_token"


cli = functools.partial(runhelp.cli, timeout=300)  # exports load and fuse a model: slower than most


@pytest.fixture(scope="module")
def run(tiny_model: Path, text_data: Path, engine_env: dict, tmp_path_factory) -> Path:
    """A real run with train and validation losses in its events."""
    out = tmp_path_factory.mktemp("push") / "run"
    done = cli(["train", "--model", str(tiny_model), "--data", str(text_data), "--out", str(out), "--iters", "6",
                "--learning-rate", "1e-2", "--batch-size", "2", "--steps-per-eval", "3", "--steps-per-report", "2",
                "--val-batches", "2", "--save-every", "6"], engine_env)
    assert done.returncode == 0, done.stderr
    return out


def hub_env(engine_env: dict, hub: UploadHub, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {**engine_env, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    return {**env, "HF_TOKEN": token} if token else env


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_push_adapter_with_model_card(run: Path, tiny_model: Path, text_data: Path, engine_env: dict,
                                      tmp_path: Path) -> None:
    from PIL import Image

    with UploadHub({}, tokens={TOKEN: set()}) as hub:
        done = cli(["push", "--adapter", str(run / "adapters"), "--repo", "me/tiny-lora", "--private"],
                   hub_env(engine_env, hub, tmp_path))
        assert done.returncode == 0, done.stderr
        assert "Hub: 4 files" in done.stdout and "with the sizes and hashes uploaded" in done.stdout
        assert TOKEN not in done.stdout + done.stderr
        files = hub.repos["me/tiny-lora"].files
        assert set(files) == {"adapters.safetensors", "adapter_config.json", "README.md", "loss_curve.png"}
        assert files["adapters.safetensors"] == (run / "adapters" / "adapters.safetensors").read_bytes()
        assert hub.created["me/tiny-lora"]["visibility"] == "private"
        assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in hub.requests)  # safetensors via LFS
        assert len(hub.commits) == 1

        card = files["README.md"].decode()
        train, val, best = events(run, "train"), events(run, "val"), events(run, "best")
        assert card.startswith("---\nlibrary_name: \"mlx\"\n")
        assert f"| base model | `{tiny_model}` |" in card and f"| data | `{text_data}` |" in card
        assert "| rank / alpha (scale) | 8 / 16 (2) |" in card and "| iters | `6` |" in card
        assert f"| final train loss | {train[-1]['loss']:.4f} (step {train[-1]['step']}) |" in card
        low = min(val, key=lambda e: e["val_loss"])
        assert f"| best validation loss | {low['val_loss']:.4f} (step {low['step']}) |" in card
        assert best[-1]["step"] == low["step"]
        assert "![Loss curve](loss_curve.png)" in card
        assert f"mlx_lm.generate --model {tiny_model} --adapter-path adapter" in card and "PeftModel" in card
        image = Image.open(io.BytesIO(files["loss_curve.png"]))
        assert image.format == "PNG" and image.size == (720, 360)
        assert len(image.convert("RGB").getcolors(maxcolors=10_000) or []) > 3  # lines drawn, not a blank canvas

        # Again as PEFT into the same repo: a second commit; the card says how to load it with PEFT.
        done = cli(["push", "--adapter", str(run / "adapters"), "--repo", "me/tiny-lora", "--format", "peft"],
                   hub_env(engine_env, hub, tmp_path))
        assert done.returncode == 0, done.stderr
        files = hub.repos["me/tiny-lora"].files
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(files)
        assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
        assert files["README.md"].decode().startswith("---\nlibrary_name: \"peft\"\n")
        assert "check.json" not in files and len(hub.commits) == 2

        # The fused model: its own check (logits against base + adapter) is reported, not uploaded.
        done = cli(["push", "--adapter", str(run / "adapters"), "--repo", "me/tiny-fused", "--format", "fused"],
                   hub_env(engine_env, hub, tmp_path))
        assert done.returncode == 0, done.stderr
        assert "fused vs base + adapter (float32)" in done.stdout and done.stdout.rstrip().endswith(": OK")
        files = hub.repos["me/tiny-fused"].files
        assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
        assert "check.json" not in files and "mlx_lm.generate --model me/tiny-fused" in files["README.md"].decode()


def test_push_refusals_and_a_hub_that_loses_data(run: Path, engine_env: dict, tmp_path: Path) -> None:
    with UploadHub({}, tokens={TOKEN: set()}) as hub:
        done = cli(["push", "--adapter", str(run / "adapters"), "--repo", "me/x"],
                   hub_env(engine_env, hub, tmp_path, token=None))
        assert done.returncode == 2 and "error: no Hugging Face token: set the environment variable HF_TOKEN" in \
            done.stderr and not hub.requests
        done = cli(["push", "--adapter", str(run / "adapters"), "--repo", "me/x"],
                   hub_env(engine_env, hub, tmp_path, token="hf_unknown"))
        assert done.returncode == 2 and "error: the hub refused: Invalid credentials" in done.stderr
        assert "me/x" not in hub.repos
        hub.requests.clear()
        done = cli(["push", "--adapter", str(run / "adapters"), "--repo", "not a repo"],
                   hub_env(engine_env, hub, tmp_path))
        assert done.returncode == 2 and "expected ORG/NAME" in done.stderr and not hub.requests

        hub.tamper = {"adapter_config.json"}
        done = cli(["push", "--adapter", str(run / "adapters"), "--repo", "me/y"], hub_env(engine_env, hub, tmp_path))
        assert done.returncode == 1
        assert "Hub: 1 of 4 files differ, e.g. adapter_config.json" in done.stdout
        assert "do not all match" in done.stderr


def test_page_push_hands_the_token_over_in_the_environment(run: Path, tmp_path: Path, monkeypatch) -> None:
    """The Save / load step's Push: the token field reaches the hub through HF_TOKEN, never the command line."""
    from lora_app.ui import save_step

    calls = []
    real_run = subprocess.run

    def spy(cmd, **kwargs):
        calls.append((cmd, kwargs["env"]))
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(save_step.subprocess, "run", spy)
    with UploadHub({}, tokens={TOKEN: set()}) as hub:
        for key, value in hub_env({}, hub, tmp_path, token=None).items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        shown = save_step.push_adapter(str(run / "adapters"), "me/page", TOKEN, True, "adapter")
        assert shown.startswith(f"Pushed to {hub.url}/me/page.") and "Hub: 4 files" in shown
        assert "me/page" in hub.repos and hub.created["me/page"]["visibility"] == "private"
    (cmd, env), = calls
    assert env["HF_TOKEN"] == TOKEN and not any(TOKEN in part for part in cmd)
    assert "--private" in cmd and f"--adapter={run / 'adapters'}" in cmd
