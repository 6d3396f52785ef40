"""Data-parallel training over processes and machines through MLX's own launcher (`mlx.launch`).

Each rank runs the ordinary trainer: it reads its share of every batch (BatchPlan's rank/world_size),
mlx-lm's `average_gradients` averages the gradients, and only rank 0 writes to the run folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, save_config_json
from .runs import TERMINAL, append_event, engine_env, run_state


def check_hostfile(path: str) -> Path:
    """mlx.launch's hostfile: a JSON list of {"ssh": host, "ips": [...]} (or an object with "hosts")."""
    hostfile = Path(path)
    if not hostfile.is_file():
        raise ConfigError(f"--hosts {hostfile}: file not found")
    try:
        data = json.loads(hostfile.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"--hosts {hostfile}: not valid JSON ({e})") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, dict) and "ssh" in h for h in hosts):
        raise ConfigError(f'--hosts {hostfile}: expected a list of {{"ssh": "host", "ips": ["..."]}} entries')
    return hostfile


def launch_command(run_dir: Path, nproc: int, hostfile: str | None, resume: bool) -> list[str]:
    inner = [sys.executable, "-m", "lora_app", "train", "--launched"]
    inner += ["--resume", str(run_dir)] if resume else ["--config", str(run_dir / "config.json"),
                                                        "--out", str(run_dir)]
    launcher = [str(Path(sys.executable).parent / "mlx.launch")]
    if hostfile:
        launcher += ["--hostfile", str(check_hostfile(hostfile))]
    else:
        launcher += ["--hosts", "127.0.0.1", "--repeat-hosts", str(nproc), "--backend", "ring"]
    return [*launcher, "--", *inner]


def launch(run_dir: Path, cfg: RunConfig, nproc: int, hostfile: str | None, resume: bool = False) -> int:
    """Write the run folder's config, then run every rank through mlx.launch; returns its exit code."""
    world = nproc if not hostfile else None
    if world and cfg.train.batch_size % world:
        raise ConfigError(f"batch_size {cfg.train.batch_size} must be divisible by --nproc {world}")
    command = launch_command(Path(run_dir), nproc, hostfile, resume)
    if not resume:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_config_json(cfg, Path(run_dir) / "config.json")
    print("launching:", " ".join(command), flush=True)
    code = subprocess.run(command, env=engine_env()).returncode
    if code and run_state(run_dir).status not in TERMINAL:  # no rank said why (ssh failed, a bad hostfile, a crash)
        message = f"mlx.launch exited with code {code} before the run ended; its output is in train.log"
        append_event(Path(run_dir), "error", message=message)
        append_event(Path(run_dir), "status", status="error", message=message)
    return code
