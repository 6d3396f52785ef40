"""Run folders: the contract between the UI and the training processes.

runs/<name>/
  config.json     the full run config (flat keys, see config.py)
  events.jsonl    one JSON object per line, appended by the trainer; a torn last line is ignored by readers
  adapters/       the latest adapter (mlx-lm layout); best/ the one with the lowest validation loss
  checkpoints/    step_NNNNNNN/ folders for exact resume
  control         "stop" or "pause", written by the UI or CLI; the trainer polls it between steps
  train.pid, train.log

A run name that arrives from the page becomes a path here only (`resolve_run`): a direct child of the runs
folder, symlinks resolved, or refused. One trainer per run folder: the training process holds an OS lock on
the folder itself (`lock_run`) for its whole life; the OS releases it when the process dies.

Imports neither mlx nor gradio, so the UI lists and follows runs without loading MLX.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text, remove_temp_files

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
TERMINAL = {"done", "stopped", "paused", "error"}
MAX_RUN_NAME = 100  # characters; file systems refuse names past 255 bytes, and a page shows far fewer


class RunError(ValueError):
    """A run name or folder that cannot be used, or a run that another process is training; one line."""


# ---- events ---------------------------------------------------------------------------------------------

def append_event(run_dir: Path, event: str, **fields: Any) -> dict:
    """Append one event line; flushed and fsynced so a reader (or a crash) sees whole lines only."""
    record = {"event": event, "time": round(time.time(), 3), **fields}
    line = json.dumps(record, default=float) + "\n"
    with open(Path(run_dir) / "events.jsonl", "a+b") as f:
        if f.tell() and not ends_with_newline(f):  # a line torn by a crash: end it, so this one stays whole
            line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    return record


def ends_with_newline(f: Any) -> bool:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


class EventReader:
    """Reads events.jsonl incrementally (for polling): only whole lines; a torn last line waits for its end."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "events.jsonl"
        self.offset = 0

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        return parse_event_lines(chunk[:end])


def parse_event_lines(data: bytes) -> list[dict]:
    events = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash mid-write: the reader skips it
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events


def read_events(run_dir: Path) -> list[dict]:
    return EventReader(run_dir).read_new()


# ---- state of a run -------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What the UI shows about a run, derived from its folder only."""

    path: Path
    status: str = "new"  # new | running | done | stopped | paused | error | interrupted
    step: int = 0
    total_steps: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    message: str = ""
    started: float | None = None
    config: dict = field(default_factory=dict)
    alive: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def active(self) -> bool:
        return self.alive and self.status not in TERMINAL


def run_state(run_dir: Path, events: list[dict] | None = None) -> RunState:
    run_dir = Path(run_dir)
    state = RunState(path=run_dir, config=read_config(run_dir))
    state.total_steps = int(state.config.get("iters", 0) or 0)
    for e in read_events(run_dir) if events is None else events:
        kind = e["event"]
        if kind == "status":
            state.status = e["status"]
            state.message = e.get("message", state.message)
            state.total_steps = e.get("total_steps", state.total_steps)
            if e["status"] == "starting" and state.started is None:
                state.started = e["time"]
        elif kind == "train":
            state.step, state.train_loss = e["step"], e["loss"]
        elif kind == "val":
            state.val_loss = e["val_loss"]
        elif kind == "best":
            state.best_val_loss, state.best_step = e["val_loss"], e["step"]
        elif kind in ("stopped", "error"):
            state.message = e.get("message", e.get("reason", ""))
    state.alive = pid_alive(read_pid(run_dir)) or is_locked(run_dir)  # a run started from a terminal has no pid file
    if state.status not in TERMINAL | {"new"} and not state.alive:
        state.status = "interrupted"  # the process died without saying so (killed, crashed, machine slept)
    return state


def prepare_run_folder(run_dir: Path) -> None:
    """Before training: the folder exists, and temporary files of writes a crash cut short are gone."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for folder in ("adapters", "best"):
        remove_temp_files(Path(run_dir) / folder)


class RunFolderReporter:
    """A run's events into its events.jsonl, its progress lines onto stdout (train.log when the app started it).
    Only rank 0 of a data-parallel run writes."""

    def __init__(self, run_dir: Path, rank: int = 0):
        self.run_dir, self.rank = Path(run_dir), rank

    def event(self, kind: str, **fields: Any) -> None:
        if self.rank == 0:
            append_event(self.run_dir, kind, **fields)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)


def read_config(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def list_runs(runs_dir: Path) -> list[RunState]:
    """All run folders under runs_dir, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    root = runs_dir.resolve()
    found = [run_state(p) for p in runs_dir.iterdir()
             if p.resolve().parent == root and (p / "config.json").is_file()]  # no link to a folder elsewhere
    return sorted(found, key=lambda s: s.started or s.path.stat().st_mtime, reverse=True)


def active_run(runs_dir: Path) -> RunState | None:
    """The run that holds the machine now, if any (one GPU, one run): one whose process is alive, also when it has
    not said so yet (a resumed run's last status is its previous process's until the new one starts)."""
    return next((s for s in list_runs(runs_dir) if s.alive), None)


def check_run_name(name: str) -> str:
    """`name` if it can be a run folder's name (one path component, not too long), else RunError."""
    if not name or not name.strip():
        raise RunError("Run: no run chosen")
    if len(name) > MAX_RUN_NAME:
        raise RunError(f"Run name: {len(name)} characters; use at most {MAX_RUN_NAME}")
    if name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise RunError(f"Run name {name!r}: must be a plain folder name (no slashes, no leading or trailing "
                       "spaces, not . or ..)")
    return name


def resolve_run(runs_dir: Path, name: str) -> Path:
    """The folder of the existing run called `name`: a direct child of runs_dir once symlinks are resolved, else
    RunError. Every run name that arrives in a request goes through here before it touches the disk."""
    root = Path(runs_dir).resolve()
    path = (root / check_run_name(name)).resolve()
    if path.parent != root:
        raise RunError(f"Run {name!r}: not a folder of {root}")
    if not path.is_dir():
        raise RunError(f"Run {name!r}: no such run in {root}")
    return path


def new_run_dir(runs_dir: Path, name: str | None = None) -> Path:
    """A fresh, empty run folder; never reuses an existing one."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = check_run_name(name) if name else time.strftime("run-%Y%m%d-%H%M%S")
    candidate, n = runs_dir / base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            suffix = f"-{n}"
            candidate = runs_dir / f"{base[:MAX_RUN_NAME - len(suffix)]}{suffix}"


# ---- one trainer per run ---------------------------------------------------------------------------------

class RunLock:
    """A held lock on a run folder: an open descriptor of the folder. Closing it, or the end of the process that
    holds it (however it ends), releases the lock."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_run(run_dir: Path, fd: int | None = None, wait: float = 1.0) -> RunLock:
    """Take the exclusive lock on the run folder, or RunError when another process holds it. `fd`: a descriptor of
    the folder inherited from a parent that holds the lock already (the app: see start_training). Waits up to
    `wait` seconds, as is_locked() takes the lock for an instant."""
    if fd is None:
        fd = os.open(run_dir, os.O_RDONLY)
    end = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Not passed on to processes the trainer starts (a library's helper process, say): one outliving a
            # killed trainer would hold the lock, and the run would look alive.
            os.set_inheritable(fd, False)
            return RunLock(fd)
        except BlockingIOError:
            if time.monotonic() >= end:
                os.close(fd)
                pid = read_pid(run_dir)
                raise RunError(f"{Path(run_dir).name}: another process is training this run"
                               f"{f' (pid {pid})' if pid_alive(pid) else ''}; stop or pause it first") from None
            time.sleep(0.05)


def is_locked(run_dir: Path) -> bool:
    """Whether a training process holds the run folder's lock."""
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here


# ---- controlling a training process ---------------------------------------------------------------------

def read_pid(run_dir: Path) -> int | None:
    try:
        return int((Path(run_dir) / "train.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def engine_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for MLX processes: on Linux CPU, preload OpenBLAS (MLX's wheel links a slow reference BLAS)."""
    env = dict(os.environ if base is None else base)
    if platform.system() == "Linux" and OPENBLAS.exists() and "libopenblas" not in env.get("LD_PRELOAD", ""):
        if env.get("LORA_APP_NO_OPENBLAS") != "1":
            env["LD_PRELOAD"] = ":".join(filter(None, [str(OPENBLAS), env.get("LD_PRELOAD")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # MLX's CUDA backend compiles its fused kernels at first use (tens of seconds on a cold cache) and caches
    # them under /tmp by default, which a reboot empties: keep them with the app's data, one folder per MLX version.
    from importlib.metadata import PackageNotFoundError, version

    from .demo import app_home

    try:
        env.setdefault("MLX_PTX_CACHE_DIR", str(app_home() / "ptx-cache" / version("mlx")))
    except PackageNotFoundError:
        pass
    return env


def train_command(run_dir: Path, resume: bool = False, extra: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "lora_app", "train"]
    cmd += ["--resume", str(run_dir)] if resume else ["--config", str(Path(run_dir) / "config.json"),
                                                       "--out", str(run_dir)]
    return cmd + list(extra or [])


def start_training(run_dir: Path, resume: bool = False, extra: list[str] | None = None) -> subprocess.Popen:
    """Start the training process for a run folder (never in the caller's process); output goes to train.log.
    The run's lock is taken here and handed to the process, so two starts of one run cannot both begin: the
    second gets RunError before it touches the folder."""
    run_dir = Path(run_dir)
    with lock_run(run_dir) as lock:
        clear_control(run_dir)
        project_root = Path(__file__).resolve().parent.parent
        env = engine_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_root), env.get("PYTHONPATH")]))
        command = train_command(run_dir, resume, [*(extra or []), "--lock-fd", str(lock.fileno())])
        with open(run_dir / "train.log", "ab") as log:
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=project_root,
                pass_fds=(lock.fileno(),), start_new_session=True,  # a Ctrl-C in the app's terminal does not hit it
            )
        atomic_write_text(run_dir / "train.pid", str(proc.pid))
    return proc


def request(run_dir: Path, action: str) -> None:
    """Ask the trainer to 'stop' (save and end) or 'pause' (save a checkpoint and end; resume continues)."""
    if action not in ("stop", "pause"):
        raise ValueError(f"unknown action {action!r}")
    atomic_write_text(Path(run_dir) / "control", action)


def read_control(run_dir: Path) -> str | None:
    try:
        return (Path(run_dir) / "control").read_text().strip() or None
    except OSError:
        return None


def clear_control(run_dir: Path) -> None:
    (Path(run_dir) / "control").unlink(missing_ok=True)


def kill(run_dir: Path, sig: int = signal.SIGTERM) -> None:
    pid = read_pid(run_dir)
    if pid_alive(pid):
        os.kill(pid, sig)
