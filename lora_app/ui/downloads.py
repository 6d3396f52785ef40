"""Model downloads for the page: each one is `python -m lora_app download REPO --json` in a process of its own, so
Cancel really stops it (a thread inside huggingface_hub cannot be stopped) and the page's process never holds
the transfer. The process prints one JSON line per progress event; this module keeps the latest one per repo."""

from __future__ import annotations

import html
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from .. import hub
from . import engine

CANCEL_WAIT_S = 10  # SIGTERM first: the download deletes its temporary files and exits


@dataclass
class Download:
    repo: str
    status: str = "starting"  # starting | running | done | cancelled | error
    done: int = 0
    total: int = 0
    rate: float = 0.0
    eta: float | None = None
    message: str = ""
    path: str = ""
    started: float = 0.0

    @property
    def active(self) -> bool:
        return self.status in ("starting", "running")


class Downloads:
    """The app's downloads by repo id: at most one process per repo."""

    def __init__(self) -> None:
        self._items: dict[str, Download] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def get(self, repo: str) -> Download | None:
        with self._lock:
            return self._items.get(repo)

    def start(self, repo: str, token: str = "", revision: str = "") -> Download:
        """Start downloading `repo` (or return the download already running). The token travels in the
        process's environment, never on its command line (other users can read command lines). HubError for
        anything but a hub repo id: the id is a command-line argument, and '-x/y' would read as a flag."""
        hub.check_repo_id(repo)
        with self._lock:
            item = self._items.get(repo)
            if item and item.active:
                return item
            env = engine.env()
            if token:
                env["HF_TOKEN"] = token
            cmd = [sys.executable, "-m", "lora_app", "download", repo, "--json"]
            cmd += ["--revision", revision] if revision else []
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=engine.ROOT, stdin=subprocess.DEVNULL)
            item = self._items[repo] = Download(repo, started=time.monotonic())
            self._procs[repo] = proc
        threading.Thread(target=self._follow, args=(item, proc), daemon=True).start()
        return item

    def _follow(self, item: Download, proc: subprocess.Popen) -> None:
        errors: list[str] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
        reader.start()
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "path" in event:
                    item.path = event["path"]
                else:
                    item.status = "running" if item.status == "starting" else item.status
                    item.done, item.total = int(event.get("done", 0)), int(event.get("total", 0))
                    item.rate, item.eta = float(event.get("rate", 0.0)), event.get("eta")
        proc.wait()
        reader.join(timeout=5)
        with self._lock:
            if item.status == "cancelled":
                return
            if proc.returncode == 0 and item.path:
                item.status, item.done = "done", max(item.done, item.total)
            else:
                item.status = "error"
                item.message = engine.error_line("".join(errors)) or f"exit code {proc.returncode}"

    def cancel(self, repo: str) -> Download | None:
        """Stop the download and leave no partial file (a process killed mid-file leaves its temporary file;
        hub.remove_partial_files clears what no live download holds)."""
        with self._lock:
            item, proc = self._items.get(repo), self._procs.get(repo)
            if not item or not item.active or proc is None:
                return item
            item.status = "cancelled"
        proc.terminate()
        try:
            proc.wait(timeout=CANCEL_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        hub.remove_partial_files(repo)
        return item


def rate_text(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.1f} MB/s" if bytes_per_s >= 1e5 else f"{bytes_per_s / 1e3:.0f} kB/s"


def progress_html(item: Download | None) -> str:
    """The download as the page's progress bar (assets/app.css .lora-progress): bytes, rate, ETA."""
    if item is None:
        return ""
    share = item.done / item.total if item.total else 0.0
    label = f"{item.repo} · {item.status}"
    if item.total:
        label += f" · {item.done / 1e6:,.1f} / {item.total / 1e6:,.1f} MB · {share:.0%}"
    if item.active and item.rate:
        label += f" · {rate_text(item.rate)}"
        label += f" · ETA {item.eta:.0f} s" if item.eta is not None else ""
    if item.message:
        label += f" · {item.message}"
    status = {"done": "done", "error": "error", "cancelled": "error"}.get(item.status, "running")
    return (f'<div class="lora-progress" data-status="{status}" data-done="{item.done}"><div class="lora-progress-bar" '
            f'style="width:{share * 100:.1f}%"></div><span>{html.escape(label)}</span></div>')
