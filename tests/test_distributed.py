"""Data-parallel training: 2 processes with MLX's ring backend on 127.0.0.1 against one process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from lora_app import runs
from lora_app.distributed import launch_command

FLAGS = ["--iters", "6", "--steps-per-report", "1", "--learning-rate", "1e-3", "--batch-size", "4",
         "--steps-per-eval", "3", "--save-every", "3", "--batching", "padded"]


def losses(run_dir, kind="train", key="loss"):
    return [e[key] for e in runs.read_events(run_dir) if e["event"] == kind]


@pytest.mark.slow
def test_two_ring_processes_match_one(tiny_model, text_data, engine_env, tmp_path):
    common = [sys.executable, "-m", "lora_app", "train", "--model", str(tiny_model), "--data", str(text_data), *FLAGS]
    one = subprocess.run([*common, "--out", str(tmp_path / "one")], env=engine_env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*common, "--out", str(tmp_path / "two"), "--nproc", "2"], env=engine_env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-2000:]
    assert np.allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), rtol=2e-3)
    assert np.allclose(losses(tmp_path / "one", "val", "val_loss"), losses(tmp_path / "two", "val", "val_loss"),
                       rtol=2e-3)
    # Only rank 0 writes: one adapter, one line per event.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapters", "best", "checkpoints",
                                                                   "config.json", "events.jsonl"]
    assert len(losses(tmp_path / "two")) == 6
    assert [e["status"] for e in runs.read_events(tmp_path / "two") if e["event"] == "status"] == [
        "starting", "running", "done"]
    # The `running` event says which hosts run the ranks (the app's Train step shows it).
    running = [e for e in runs.read_events(tmp_path / "two") if e.get("status") == "running"]
    assert running[0]["world_size"] == 2 and running[0]["hosts"] == [socket.gethostname()] * 2
    alone = [e for e in runs.read_events(tmp_path / "one") if e.get("status") == "running"]
    assert alone[0]["world_size"] == 1 and alone[0]["hosts"] == [socket.gethostname()]


def test_launch_command_for_a_hostfile(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]))
    cmd = launch_command(tmp_path / "run", 0, str(hostfile), resume=False)
    # mlx.launch reads the checked copy in the run folder, never the user's file.
    assert cmd[0].endswith("mlx.launch") and cmd[1:3] == ["--hostfile", str(tmp_path / "run" / "hosts.json")]
    assert json.loads((tmp_path / "run" / "hosts.json").read_text()) == json.loads(hostfile.read_text())
    inner = cmd[cmd.index("--") + 1:]
    assert inner[1:5] == ["-m", "lora_app", "train", "--launched"]
    assert inner[-4:] == ["--config", str(tmp_path / "run" / "config.json"), "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("content,message", [("not json", "not valid JSON"), ('{"a": 1}', "expected a list")])
def test_bad_hostfile(content, message, tiny_model, text_data, engine_env, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(content)
    result = subprocess.run([sys.executable, "-m", "lora_app", "train", "--model", str(tiny_model), "--data",
                             str(text_data), "--out", str(tmp_path / "r"), "--hosts", str(hostfile)],
                            env=engine_env, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_launch_that_fails_before_training_ends_as_an_error(tiny_model, text_data, engine_env, tmp_path):
    """mlx.launch refuses a ring hostfile without IPs; no rank starts, so the launcher records the error."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1"}, {"ssh": "127.0.0.1"}]))
    result = subprocess.run([sys.executable, "-m", "lora_app", "train", "--model", str(tiny_model), "--data",
                             str(text_data), "--out", str(tmp_path / "r"), "--hosts", str(hostfile)],
                            env=engine_env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "requires IPs" in result.stdout + result.stderr
    state = runs.run_state(tmp_path / "r")
    assert state.status == "error" and "mlx.launch exited with code" in state.message
