"""The Test step's model worker: one `python -m lora_app serve` process per (model, adapter, chat template), kept
warm between messages, so a message costs its own tokens only (no process start, no model load, and mlx-lm's prompt
cache holds the conversation so far). It ends when the model, adapter or template changes, after `idle_s` without a
message, or when training starts: training always wins the memory and the cores.

Process management and the worker's HTTP client; no gradio. The app has one `Workers` (WORKERS).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .. import runs

ROOT = Path(__file__).resolve().parent.parent.parent
IDLE_S = float(os.environ.get("LORA_APP_CHAT_IDLE_S", 600))
START_TIMEOUT_S = 120  # until the worker listens (its imports; the model loads after, while the first message waits)
ADAPTER_ID = "adapter"  # the worker's model id for the adapter ("base" for the base model: serve.BASE)


class WorkerError(RuntimeError):
    """The worker could not start or answer; the message is its error line."""


@dataclass(frozen=True)
class WorkerKey:
    """What a worker has loaded: a message for another key needs another worker."""

    model: str
    adapter: str = ""  # "" for none
    template: str = "own"


@dataclass
class Reply:
    """One answer as it streams: its text so far, timings and the worker's token counts."""

    text: str = ""
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None  # time to the first text, from the request
    chunks: int = 0
    finish_reason: str | None = None  # "stop", "length"; None while streaming or when stopped
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, prompt_tokens_details.cached_tokens
    stopped: bool = False
    elapsed_s: float = 0.0

    @property
    def tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or self.chunks)

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token (the prompt's time is in first_token_s)."""
        if self.first_token_s is None or self.tokens < 2 or self.elapsed_s <= self.first_token_s:
            return None
        return (self.tokens - 1) / (self.elapsed_s - self.first_token_s)

    def stats(self) -> str:
        if self.first_token_s is None:
            return "stopped before the first token" if self.stopped else "no answer"
        prompt = self.usage.get("prompt_tokens")
        cached = (self.usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        parts = [f"{self.tokens} tokens", f"first token {self.first_token_s:.2f} s"]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        if prompt is not None:
            parts.append(f"prompt {prompt} tokens ({cached or 0} cached)")
        return " · ".join(parts) + (" · stopped" if self.stopped else "")


@dataclass(eq=False)
class Stream:
    """An answer being read from the worker: its socket, and whether Stop ended it."""

    sock: socket.socket
    interrupted: bool = False


class Worker:
    """A running `serve` process and how to reach it."""

    def __init__(self, key: WorkerKey, proc: subprocess.Popen, url: str, api_key: str, log) -> None:
        self.key, self.proc, self.url, self.api_key, self.log = key, proc, url, api_key, log
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def error_line(self) -> str:
        from .engine import error_line

        try:
            self.log.seek(0)
            return error_line(self.log.read().decode("utf-8", "replace"))
        except ValueError:  # closed: the worker was released meanwhile
            return ""


def start_worker(key: WorkerKey, timeout: float = START_TIMEOUT_S) -> Worker:
    """Start `python -m lora_app serve` for `key` on a free local port with a fresh key; returns once it listens."""
    api_key = secrets.token_urlsafe(24)
    cmd = [sys.executable, "-m", "lora_app", "serve", f"--model={key.model}", "--port=0", "--host=127.0.0.1",
           f"--chat-template={key.template}", "--with-parent"]
    cmd += [f"--adapter={ADAPTER_ID}={key.adapter}"] if key.adapter else []
    env = runs.engine_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["LORA_APP_API_KEY"] = api_key  # not on the command line, which other users' `ps` shows
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    worker = Worker(key, proc, "", api_key, log)
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            line += chunk
            if chunk:
                continue
        if proc.poll() is not None or time.monotonic() > deadline:
            message = worker.error_line() if proc.poll() is not None else f"no answer within {timeout:.0f} s"
            worker.stop()
            raise WorkerError(message or f"the model worker ended (exit code {proc.returncode})")
    worker.url = line.split()[1].decode()  # "serving http://127.0.0.1:PORT/v1 models: ..."
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # nothing blocks on a full pipe
    return worker


class Workers:
    """The app's one worker at a time: `get(key)` reuses or replaces it; `release(reason)` ends it; a thread ends
    it after `idle_s` without a message, or when `busy()` names a training run (one started outside the app)."""

    def __init__(self, idle_s: float = IDLE_S, busy: Callable[[], str | None] | None = None) -> None:
        self.idle_s, self.busy = idle_s, busy
        self.lock = threading.RLock()
        self.worker: Worker | None = None
        self.last_used = time.monotonic()
        self.released: str | None = None  # why the last worker ended, for the page
        self.streams: set[Stream] = set()
        self.reaper: threading.Thread | None = None
        self.interrupted_at = 0.0  # when Stop was last pressed (monotonic)

    def get(self, key: WorkerKey) -> Worker:
        with self.lock:
            if self.worker is not None and (self.worker.key != key or not self.worker.alive()):
                self.release("the model, adapter or chat template changed" if self.worker.alive()
                             else "it ended")
            if self.worker is None:
                self.worker = start_worker(key)
                self.released = None
            self.last_used = time.monotonic()
            if self.reaper is None:
                self.reaper = threading.Thread(target=self.reap, daemon=True)
                self.reaper.start()
            return self.worker

    def release(self, reason: str) -> bool:
        """End the worker (answers in flight end with it); False when none was running."""
        with self.lock:
            worker, self.worker = self.worker, None
            if worker is None:
                return False
            self.released = reason
        self.interrupt()
        worker.stop()
        return True

    def release_unless(self, model: str) -> bool:
        """End the worker when it serves another model than `model` (the page's model changed)."""
        with self.lock:
            if self.worker is not None and self.worker.key.model != model:
                return self.release("the model changed")
        return False

    def interrupt(self) -> int:
        """Stop the answers streaming now (the Stop button): their connections are closed, which makes mlx-lm's
        server stop generating at its next token. Returns how many were stopped."""
        with self.lock:
            streams = list(self.streams)
            self.interrupted_at = time.monotonic()
        for stream in streams:
            stream.interrupted = True
            try:
                stream.sock.shutdown(socket.SHUT_RDWR)  # the reading thread sees the end of the stream at once
            except OSError:
                pass
        return len(streams)

    def reap(self) -> None:
        checked = 0.0
        while True:
            time.sleep(min(5.0, max(self.idle_s / 4, 0.2)))
            with self.lock:
                if self.worker is None or self.streams:
                    continue
                if time.monotonic() - self.last_used > self.idle_s:
                    self.release(f"idle for {self.idle_s:.0f} s")
                elif self.busy is not None and time.monotonic() - checked > 10:
                    checked = time.monotonic()
                    name = self.busy()
                    if name:
                        self.release(training_reason(name))

    def chat(self, key: WorkerKey, model_id: str, messages: list[dict], settings: dict) -> Iterator[Reply]:
        """Stream one answer from the worker for `key` (started if needed): the Reply after each piece of text."""
        asked = time.monotonic()
        worker = self.get(key)
        host, port = urlsplit(worker.url).hostname, urlsplit(worker.url).port
        conn = http.client.HTTPConnection(host, port, timeout=600)
        body = {"model": model_id, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                **settings}
        reply = Reply()
        try:
            conn.connect()
        except OSError as e:
            raise WorkerError(f"the model worker did not answer: {e}") from None
        stream = Stream(conn.sock)  # the socket itself: http.client lets go of it once an HTTP/1.0 answer starts
        with self.lock:
            self.streams.add(stream)
            stream.interrupted = self.interrupted_at > asked  # Stop while the worker was starting
        try:
            if stream.interrupted:
                raise ConnectionAbortedError("stopped")
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {worker.api_key}"})
            response = conn.getresponse()
            if response.status != 200:
                raise WorkerError(answer_error(response.read()) or f"the worker answered {response.status}")
            yield from read_stream(response, reply)
        except OSError as e:
            if not stream.interrupted:
                raise WorkerError(f"the model worker did not answer: {e}") from None
        finally:
            with self.lock:
                self.streams.discard(stream)
                self.last_used = time.monotonic()
            conn.close()
            stream.sock.close()
        if reply.finish_reason is None:  # the stream ended early: Stop, or the worker ended
            if not stream.interrupted:
                time.sleep(0.2)
                raise WorkerError(worker.error_line() or "the model worker ended mid-answer")
            reply.stopped = True
        reply.elapsed_s = time.monotonic() - reply.started
        yield reply

    def status(self) -> str:
        with self.lock:
            w = self.worker
            if w is not None and w.alive():
                idle = f"{self.idle_s / 60:.0f} min" if self.idle_s >= 120 else f"{self.idle_s:.0f} s"
                return (f"Model worker: pid {w.pid}, {w.url} (kept loaded; ends after {idle} without a message, "
                        "on a model change, or when training starts)")
            if self.released:
                return f"Model worker: ended ({self.released}); the next message starts it again."
            return "Model worker: not started; the first message starts it (and loads the model)."


def read_stream(response: http.client.HTTPResponse, reply: Reply) -> Iterator[Reply]:
    """Server-sent events of a streamed chat completion into `reply`, yielding it after each piece of text."""
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            reply.usage = event["usage"]
        for choice in event.get("choices", []):
            reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                reply.first_token_s = reply.first_token_s or time.monotonic() - reply.started
                reply.text += text
                reply.chunks += 1
                reply.elapsed_s = time.monotonic() - reply.started
                yield reply


def answer_error(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error") or "")
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace").strip()


def training_reason(run_name: str) -> str:
    return f"paused: training run {run_name} started, and training needs the memory and the cores"


WORKERS = Workers()
