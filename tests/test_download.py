"""Downloads from the hub, end to end: the real huggingface_hub client against tests/hubserver.py (no network), the
CLI `python -m lora_app download` as the app runs it (a subprocess, cancelled by SIGTERM or killed), and the
rule that resolving a model never downloads."""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hubserver import FakeHub, FakeRepo

from lora_app import hub as hub_api
from lora_app.models import ModelError, resolve_model

REPO, GATED, GGUF_ONLY, MISSING = "org/tiny", "org/gated", "org/gguf-only", "org/missing"
GRANTED, NOT_GRANTED = "hf_granted_token", "hf_token_without_access"
DOWNLOAD = [sys.executable, "-m", "lora_app", "download"]
DECOYS = {  # what a real repo holds beside the model's files; none of it may be fetched
    "pytorch_model.bin": bytes(range(256)) * 300, "tiny-Q4_K_M.gguf": b"GGUF" + bytes(50_000),
    "onnx/model.onnx": bytes(20_000), "original/model.safetensors": bytes(30_000), "README.md": b"# tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "logo.png": bytes(5_000),
}


@pytest.fixture(scope="module")
def served(tiny_model) -> dict[str, FakeRepo]:
    files = FakeRepo.from_folder(tiny_model, DECOYS).files
    no_weights = {name: data for name, data in files.items() if not name.endswith(".safetensors")}
    return {REPO: FakeRepo(files, license="mit"), GATED: FakeRepo(dict(files), gated=True, license="llama3.2"),
            GGUF_ONLY: FakeRepo(no_weights)}


@pytest.fixture(scope="module")
def needed(tiny_model) -> dict[str, bytes]:
    """The files a model needs: everything tiny.build_tiny_model writes (config, tokenizer, template, weights)."""
    return {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()}


@pytest.fixture
def hub(served):
    with FakeHub(served, tokens={GRANTED: {GATED}, NOT_GRANTED: set()}) as server:
        yield server


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


@pytest.fixture
def env(engine_env, hub, cache, tmp_path) -> dict[str, str]:
    """The CLI's environment: the fake hub, a fresh cache, no token (HF_HOME has no saved login)."""
    e = {k: v for k, v in engine_env.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return {**e, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture
def here(monkeypatch, hub, cache, tmp_path):
    """The same for calls in this process: huggingface_hub read HF_ENDPOINT and HF_HUB_CACHE at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def run(cmd, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def partials(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.incomplete"))


def start_and_wait_mid_file(env, cache, min_done=100_000) -> tuple[subprocess.Popen, list[dict]]:
    """Start `download --json` and return once the weights are part-way through (a temporary file on disk)."""
    proc = subprocess.Popen([*DOWNLOAD, REPO, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    events, deadline = [], time.time() + 60
    while time.time() < deadline:
        try:
            events.append(json.loads(lines.get(timeout=1)))
        except queue.Empty:
            assert proc.poll() is None, proc.stderr.read()
            continue
        if events[-1].get("done", 0) >= min_done and partials(cache):
            return proc, events
    proc.kill()
    raise AssertionError(f"no progress past {min_done} bytes: {events[-3:]}")


def test_download_reports_progress_and_fetches_only_the_model_files(hub, env, cache, needed):
    hub.throttle = 400_000  # ~1.3 s: several progress events at ~4 a second
    result = run([*DOWNLOAD, REPO, "--json"], env)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    events, last = lines[:-1], lines[-1]
    total = sum(len(data) for data in needed.values())
    assert len(events) >= 3 and len({e["done"] for e in events}) >= 3, events
    assert all(e["total"] == total and e["files_total"] == len(needed) for e in events)
    assert [e["done"] for e in events] == sorted(e["done"] for e in events)
    assert events[-1]["done"] == total and events[-1]["files_done"] == len(needed) and events[-1]["eta"] == 0
    assert any(e["rate"] > 0 and e["eta"] is not None and 0 < e["done"] < total for e in events)

    snapshot = Path(last["path"])
    assert snapshot == cache / "models--org--tiny" / "snapshots" / hub.repos[REPO].sha
    assert sorted(p.name for p in snapshot.rglob("*")) == sorted(needed)  # no .bin, .gguf, onnx/, original/ ...
    assert all((snapshot / name).read_bytes() == data for name, data in needed.items())
    assert len(list((cache / "models--org--tiny" / "blobs").iterdir())) == len(needed)
    fetched = " ".join(path for method, path in hub.requests)
    assert not any(decoy in fetched for decoy in DECOYS), fetched
    assert hub.count(hashlib.sha256(needed["model.safetensors"]).hexdigest()) == 1  # the weights came once


def test_sigterm_mid_file_cancels_and_leaves_no_partial_files(hub, env, cache, here):
    hub.throttle = 100_000  # the weights take ~5 s
    proc, events = start_and_wait_mid_file(env, cache)
    assert events[-1]["done"] < events[-1]["total"]
    proc.send_signal(signal.SIGTERM)
    started = time.time()
    returncode = proc.wait(timeout=15)
    assert time.time() - started < 5
    assert returncode == 128 + signal.SIGTERM
    assert proc.stderr.read().strip().splitlines() == ["download cancelled"]
    assert partials(cache) == []
    assert hub_api.cached_model(REPO) is None and hub_api.cached_models() == []
    with pytest.raises(ModelError, match="not downloaded yet"):
        resolve_model(REPO)


def test_download_after_sigkill_completes_and_the_model_loads(hub, env, cache, needed, here):
    hub.throttle = 100_000
    proc, _ = start_and_wait_mid_file(env, cache)
    proc.kill()
    proc.wait(timeout=15)
    stale = partials(cache)
    assert len(stale) == 1 and stale[0].parent.name == "blobs"  # a killed process cannot clean up

    hub.throttle = None
    result = subprocess.run([*DOWNLOAD, REPO], env=env, capture_output=True, timeout=120)  # bytes: keep the \r
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.decode().strip())
    assert result.stderr.startswith(b"\r") and result.stderr.rstrip().endswith(b"5/5 files")  # the progress line
    assert partials(cache) == []
    assert (snapshot / "model.safetensors").read_bytes() == needed["model.safetensors"]
    assert hub_api.cached_model(REPO) == snapshot
    from lora_app.models import inspect_path

    info = inspect_path(REPO)
    assert info.path == str(snapshot) and info.num_blocks == 2 and info.architecture == "llama"


def test_remove_partial_files_keeps_the_file_a_live_download_writes(here, cache):
    from filelock import FileLock

    blobs = cache / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    live, stale = blobs / ("a" * 64 + ".1234abcd.incomplete"), blobs / ("b" * 64 + ".5678ef01.incomplete")
    live.write_bytes(b"x")
    stale.write_bytes(b"y")
    locks = cache / ".locks" / "models--org--tiny"
    locks.mkdir(parents=True)
    with FileLock(str(locks / f"{'a' * 64}.lock")):  # what huggingface_hub holds while it writes the blob
        assert hub_api.remove_partial_files(REPO) == 1
    assert live.exists() and not stale.exists()
    assert hub_api.remove_partial_files(REPO) == 1 and not live.exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_errors_are_one_line_that_says_what_to_do(hub, env):
    port = closed_port()
    cases = {  # name: (repo, extra environment, what the line must say)
        "missing": (MISSING, {}, [MISSING, "no such model", "https://huggingface.co/org/missing"]),
        "gated, no token": (GATED, {}, [GATED, "gated", "https://huggingface.co/org/gated", "hf auth login"]),
        "gated, token without access": (GATED, {"HF_TOKEN": NOT_GRANTED}, [GATED, "no access", "license"]),
        "bad token": (REPO, {"HF_TOKEN": "hf_unknown"}, [REPO, "refused the token", "HF_TOKEN"]),
        "gguf only": (GGUF_ONLY, {}, [GGUF_ONLY, "GGUF", "safetensors"]),
        "bad revision": (REPO, {"REVISION": "v9"}, [REPO, "'v9' not found"]),
        "no network": (REPO, {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, [f"cannot reach 127.0.0.1:{port}"]),
        "not a repo id": ("a/b/c", {}, ["not a hub repo id"]),
    }
    procs = {}
    for name, (repo, extra, _) in cases.items():
        revision = ["--revision", extra.pop("REVISION")] if "REVISION" in extra else []
        procs[name] = subprocess.Popen([*DOWNLOAD, repo, *revision], env={**env, **extra}, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert all(part in lines[0] for part in cases[name][2]), (name, lines[0])
        assert out == ""

    result = run([*DOWNLOAD, GATED], {**env, "HF_TOKEN": GRANTED})
    assert result.returncode == 0, result.stderr
    assert (Path(result.stdout.strip()) / "model.safetensors").is_file()


def test_resolving_a_hub_id_never_downloads(here, env, cache):
    with pytest.raises(ModelError) as error:
        resolve_model(REPO)
    assert str(error.value) == (f"{REPO} is not downloaded yet: download it in the Model step or run "
                                f"`python -m lora_app download {REPO}`")
    result = run([sys.executable, "-m", "lora_app", "inspect", "--model", REPO], env)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {error.value}"
    assert here.requests == [] and not cache.exists()

    snapshot = hub_api.download(REPO)
    assert resolve_model(REPO) == str(snapshot)
    assert hub_api.cached_models() == [{"repo": REPO, "path": str(snapshot), "revision": here.repos[REPO].sha,
                                        "size_bytes": sum(p.stat().st_size for p in snapshot.iterdir()),
                                        "refs": ["main"]}]


def test_a_downloaded_model_trains_without_the_network(hub, env, cache, text_data, tmp_path):
    assert run([*DOWNLOAD, REPO], env).returncode == 0
    requests = len(hub.requests)
    out = tmp_path / "run"
    result = run([sys.executable, "-m", "lora_app", "train", "--model", REPO, "--data", str(text_data), "--out",
                  str(out), "--iters", "2", "--batch-size", "2", "--steps-per-report", "1", "--steps-per-eval", "2",
                  "--val-batches", "1"], env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapters" / "adapters.safetensors").is_file()
    assert json.loads((out / "adapters" / "adapter_config.json").read_text())["model"] == REPO
    assert len(hub.requests) == requests


def test_remote_summary_and_plan(here, cache, needed, tiny_model):
    total = sum(len(data) for data in needed.values())
    summary = hub_api.remote_summary(REPO)
    assert summary["download_bytes"] == total and summary["gated"] is False and summary["license"] == "mit"
    assert summary["config"] == json.loads((tiny_model / "config.json").read_text())
    assert sorted(name for name, _ in summary["files"]) == sorted(needed)
    # Only config.json came down: no model in the cache yet, and the plan counts the rest as missing.
    assert hub_api.cached_model(REPO) is None and hub_api.cached_models() == []
    plan = hub_api.plan_download(REPO)
    assert plan.revision == here.repos[REPO].sha and plan.total_bytes == total
    assert plan.missing_bytes == total - len(needed["config.json"])
    assert dict(plan.files) == {name: len(data) for name, data in needed.items()}

    with pytest.raises(hub_api.HubError, match="accept its license at https://huggingface.co/org/gated"):
        hub_api.remote_summary(GATED)
    gated = hub_api.remote_summary(GATED, token=GRANTED)
    assert gated["gated"] is True and gated["license"] == "llama3.2" and gated["config"] == summary["config"]
    with pytest.raises(hub_api.HubError, match="GGUF"):
        hub_api.remote_summary(GGUF_ONLY)
    with pytest.raises(hub_api.HubError, match="no such model"):
        hub_api.remote_summary(MISSING)


def test_the_hub_module_imports_neither_gradio_nor_mlx_nor_the_hub_client():
    code = ("import sys, lora_app.hub, lora_app.models; "
            "print(sorted(m for m in ('gradio', 'mlx', 'huggingface_hub') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
