"""Helpers for the reliability tests: start runs of the tiny model, follow their events, hash folders."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from lora_app import runs
from lora_app.config import RunConfig, save_config_json
from lora_app.ui.settings import config_to_form

# Small and fast, but with dropout and packing so exact resume has something to get wrong.
FAST = {"iters": 12, "batch_size": 2, "max_seq_length": 64, "steps_per_report": 1, "steps_per_eval": 0,
        "save_every": 4, "keep_checkpoints": 2, "dropout": 0.1, "batching": "packed", "learning_rate": 1e-3,
        "seed": 3}


def make_run(run_dir: Path, model: Path, data: Path, **overrides: object) -> Path:
    """A run folder holding only config.json, as the UI prepares it before starting."""
    cfg = RunConfig.from_flat({**FAST, "model": str(model), "data": str(data), **overrides})
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config_json(cfg, run_dir / "config.json")
    return run_dir


def start(run_dir: Path, resume: bool = False, extra: list[str] | None = None) -> subprocess.Popen:
    return runs.start_training(run_dir, resume=resume, extra=extra)


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    return proc.wait(timeout=timeout)


def train_steps(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step reported twice (before a crash and after the resume) keeps the last report."""
    return {e["step"]: e["loss"] for e in runs.read_events(run_dir) if e["event"] == "train"}


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 60) -> int:
    """Poll events until a train event with step >= `step`; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = max(train_steps(run_dir), default=0)
        if seen >= step:
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {log_tail(run_dir)}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s: {log_tail(run_dir)}")


def final_status(run_dir: Path) -> str:
    return runs.run_state(run_dir).status


def log_tail(run_dir: Path, n: int = 2000) -> str:
    try:
        return (run_dir / "train.log").read_text(errors="replace")[-n:]
    except OSError:
        return ""


def cli(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 120,
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_app", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def cli_in_process(args: list[str], capfd, monkeypatch) -> subprocess.CompletedProcess:
    """cli(args) without a new process (whose Python and MLX start-up cost seconds): the CLI's main(argv), its
    output captured, its exit code returned. main() re-execs itself with OpenBLAS preloaded when LD_PRELOAD differs
    from engine_env()'s: here it is made equal and os.execve refused, so the pytest process is never replaced."""
    from lora_app import runs
    from lora_app.__main__ import main

    preload = runs.engine_env().get("LD_PRELOAD")
    if preload:
        monkeypatch.setenv("LD_PRELOAD", preload)
    else:
        monkeypatch.delenv("LD_PRELOAD", raising=False)

    def no_exec(*_args: object) -> None:
        raise AssertionError("main() tried to exec a new process inside pytest")

    monkeypatch.setattr(os, "execve", no_exec)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # a trainer installs its own
    capfd.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse exits after printing its message
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except Exception:  # what the process would print: the test's "no traceback" check then sees it
        traceback.print_exc()
        code = 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out = capfd.readouterr()
    return subprocess.CompletedProcess(["lora_app", *args], code, out.out, out.err)


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest): proof that nothing changed."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def form_values(**overrides: object) -> dict:
    """The Train step's form by config name, as the page starts (model and data set to placeholders)."""
    return {**config_to_form(RunConfig()), "model": "/m", "data": "/d", **overrides}
