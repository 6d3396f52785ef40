"""The engine through subprocesses, so MLX never loads in the UI process and a corrupt model cannot take
the page down: inspect, backend info, streaming generation, export."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import runs
from ..memory import available_memory, system_memory_available

ROOT = Path(__file__).resolve().parent.parent.parent
BACKEND_CODE = (
    "import json, mlx.core as mx; d = mx.default_device(); info = {}\n"
    "try:\n    info = {k: v for k, v in mx.device_info().items() if isinstance(v, (int, float, str))}\n"
    "except Exception:\n    pass\n"
    "gpu = 'Apple GPU (Metal)' if mx.metal.is_available() else ('CUDA' if getattr(mx, 'cuda', None) "
    "and mx.cuda.is_available() else 'CPU')\n"
    "print(json.dumps({'device': str(d), 'backend': gpu if d == mx.gpu else 'CPU', 'info': info}))"
)


class EngineError(RuntimeError):
    """A CLI call that failed; the message is its last stderr line (our CLI prints one clear line)."""


def env() -> dict[str, str]:
    e = runs.engine_env()
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return e


def cli(*args: str, timeout: float = 600) -> str:
    """Run `python -m lora_app ARGS`; stdout on success, EngineError with the error line otherwise."""
    return run([sys.executable, "-m", "lora_app", *args], timeout)


def run(cmd: list[str], timeout: float, describe: Callable[[str], str] | None = None) -> str:
    """The command's stdout; EngineError with `describe(stderr)` (default: its error line) when it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EngineError(f"{cmd[3] if len(cmd) > 3 else cmd[0]}: no answer within {timeout:.0f}s") from None
    if done.returncode != 0:
        raise EngineError((describe or error_line)(done.stderr) or f"exit code {done.returncode}")
    return done.stdout


def preview(model: str, data: str, data_format: str, valid_fraction: float, mask_prompt: bool, skip_bad_rows: bool,
            max_seq_length: int, batch_size: int, objective: str = "sft", timeout: float = 300) -> dict:
    """`python -m lora_app preview --json`: the Data step's rows and statistics, read and tokenized in a process of
    their own, so a big dataset's memory is given back when it ends. EngineError carries the CLI's whole message
    (a dataset's problems take several lines)."""
    cmd = [sys.executable, "-m", "lora_app", "preview", f"--model={model}", f"--data={data}",  # '=': a value
           f"--data-format={data_format}", f"--valid-fraction={valid_fraction}",  # never reads as a flag
           f"--max-seq-length={max_seq_length}", f"--batch-size={batch_size}", f"--objective={objective}", "--json"]
    cmd += ["--mask-prompt"] * mask_prompt + ["--skip-bad-rows"] * skip_bad_rows
    return json.loads(run(cmd, timeout, describe=error_message))


def error_message(stderr: str, max_lines: int = 25) -> str:
    """Our CLI's message from its 'error:' line on (it may list problems below it); else error_line."""
    lines = stderr.strip().splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), None)
    if first is None or any(ln.startswith("Traceback") for ln in lines[first:]):
        return error_line(stderr)
    return "\n".join(lines[first:first + max_lines]).removeprefix("error:").strip()


def error_line(stderr: str) -> str:
    """The line that says what went wrong: ours start with 'error:'; else the last line of a traceback."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error:")]
    return (ours or lines or [""])[-1].removeprefix("error:").strip()


_inspect_cache: dict[tuple[str, float], dict] = {}


def inspect(model: str) -> dict:
    """`python -m lora_app inspect` as a dict (cached per folder and config.json time)."""
    path = Path(model).expanduser()
    key = (model, (path / "config.json").stat().st_mtime if (path / "config.json").is_file() else 0.0)
    if key not in _inspect_cache:
        _inspect_cache[key] = json.loads(cli("inspect", "--model", model, timeout=900))
    return _inspect_cache[key]


def backend() -> dict:
    """The MLX device (Apple GPU / CUDA / CPU), via a tiny subprocess, asked once: it does not change while the
    app runs. EngineError when MLX did not start, the same each time."""
    found = probe_backend()
    if isinstance(found, EngineError):
        raise EngineError(str(found))
    return found


@functools.cache
def probe_backend() -> dict | EngineError:
    """backend()'s answer, or the error it ended with: kept too, since the memory line and the catalog ask on every
    change of the form, and an MLX that did not start would cost a subprocess (up to its timeout) each time."""
    try:
        return json.loads(run([sys.executable, "-c", BACKEND_CODE], timeout=120))
    except EngineError as e:
        return e


def machine() -> tuple[str, int]:
    """(where training runs: 'gpu' or 'cpu', the bytes it may use), the number the trainer's own memory check reads
    (memory.available_memory: a Mac's GPU working set, a CUDA card's memory, else the system's available memory)."""
    try:
        b = backend()
    except EngineError:
        b = {"backend": "CPU", "info": {}}
    return ("cpu" if b["backend"] == "CPU" else "gpu"), available_memory(b["info"])[0]


def memory_available_gb() -> float | None:
    """Memory the system can give now, for display; None where the OS does not say (macOS)."""
    return system_memory_available()[0] / 1e9 or None


def export(adapter: str, fmt: str, out: str, model: str | None = None, dequantize: bool = False) -> str:
    args = ["export", "--adapter", adapter, "--format", fmt, "--out", out]
    args += ["--model", model] if model else []
    args += ["--dequantize"] if dequantize else []
    return cli(*args, timeout=1800).strip()


def stream_generate(model: str, adapter: str | None, prompt: str, max_tokens: int,
                    chat: bool = True) -> Iterator[str]:
    """Yield the answer so far while `python -m lora_app generate` prints it; EngineError on failure."""
    cmd = [sys.executable, "-m", "lora_app", "generate", "--model", model, "--prompt", prompt,
           "--max-tokens", str(int(max_tokens))]
    cmd += ["--adapter", adapter] if adapter else []
    cmd += [] if chat else ["--no-chat"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    text, raw = "", b""
    try:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            raw += chunk
            text = raw.decode("utf-8", errors="ignore")
            yield text
        proc.wait()
    finally:
        if proc.poll() is None:  # the page went away mid-stream: end the generator process
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise EngineError(error_line(b"".join(errors).decode("utf-8", "replace")) or f"exit {proc.returncode}")
    yield text.rstrip("\n")


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll until predicate() is true (used after asking a run to stop)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
