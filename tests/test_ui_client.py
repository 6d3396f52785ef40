"""The running app driven over HTTP with gradio_client: a run on the tiny model from Start to Stop."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lora_app import runs
from lora_app.config import RunConfig
from lora_app.ui.loss_plot import points_in
from lora_app.ui.settings import FORM_KEYS, config_to_form

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(runs_dir: Path, env: dict[str, str]) -> Iterator[str]:
    """`python app.py --no-browser` in a subprocess; yields its URL; ends it (and any run it started)."""
    port = free_port()
    log = open(runs_dir.parent / f"app-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "app.py", "--no-browser", "--port", str(port), "--runs-dir",
                             str(runs_dir)], cwd=ROOT, env={**env, "GRADIO_ANALYTICS_ENABLED": "False"},
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert proc.poll() is None, (runs_dir.parent / f"app-{port}.log").read_text()
            assert time.monotonic() < deadline, "the app did not start within 90 s"
            time.sleep(0.3)
        yield url
    finally:
        for state in runs.list_runs(runs_dir):
            if state.alive:
                runs.kill(state.path)
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def form(**overrides) -> list:
    values = config_to_form(RunConfig())
    values.update(overrides)
    return [values[k] for k in FORM_KEYS]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def plot_points(poll_output: tuple) -> list[tuple[int, float, str]]:
    """[(step, loss, series)] of the loss plot (an SVG) in a /poll or /follow answer."""
    plot = poll_output[2]
    if isinstance(plot, dict):  # inside an update
        plot = plot.get("value")
    return points_in(plot or "")


@pytest.fixture(scope="module")
def app(tmp_path_factory, engine_env):
    runs_dir = tmp_path_factory.mktemp("ui-client") / "runs"
    with running_app(runs_dir, engine_env) as url:
        yield url, runs_dir


@pytest.mark.slow
def test_run_from_start_to_stop(app, tiny_model, text_data, tmp_path):
    from gradio_client import Client

    url, runs_dir = app
    client = Client(url, verbose=False)
    info = client.predict(str(tiny_model), api_name="/inspect")
    assert "2 blocks" in info and "self_attn.q_proj" in info

    settings = form(model=str(tiny_model), data=str(text_data), iters=100000, steps_per_report=5,
                    steps_per_eval=50, learning_rate=1e-3, modules=["self_attn.q_proj", "mlp.down_proj"],
                    probe_prompts="the red cat")
    refused = client.predict("", *form(model=str(tiny_model), data=str(text_data), rank=0), api_name="/start")
    assert "rank must be at least 1" in refused and not runs_dir.exists()
    started = client.predict("first", *settings, api_name="/start")
    assert "Started **first**" in started
    again = client.predict("second", *settings, api_name="/start")
    assert "One run at a time: first is still training" in again and not (runs_dir / "second").exists()

    out = wait_until(lambda: (o := client.predict(api_name="/poll")) and len(plot_points(o)) >= 4 and o,
                     120, "the loss plot to have points")
    steps = [step for step, _, series in plot_points(out) if series == "train"]
    assert steps == sorted(steps) and len(steps) >= 2 and "running" in out[0]
    assert client.predict(api_name="/stop").startswith("Stop requested for **first**")
    wait_until(lambda: not runs.run_state(runs_dir / "first").alive, 60, "the run to stop")
    assert runs.run_state(runs_dir / "first").status == "stopped"
    adapter = runs_dir / "first" / "adapters"
    assert (adapter / "adapters.safetensors").stat().st_size > 0 and (adapter / "adapter_config.json").is_file()

    # The runs list and the Save step see the run; a second client (a reload) re-attaches to its curve.
    table = client.predict(api_name="/refresh_runs")[0]
    assert table["data"][0][0] == "first" and table["data"][0][2] == "stopped"
    other = Client(url, verbose=False)
    assert other.predict("first", api_name="/open_run").startswith("Opened")
    assert len(plot_points(other.predict(api_name="/poll"))) >= len(plot_points(out))

    exported = yaml.safe_load(Path(client.predict("first", api_name="/export_run_yaml")).read_text())
    assert exported["model"] == str(tiny_model) and exported["lora_parameters"]["keys"] == [
        "mlp.down_proj", "self_attn.q_proj"] or exported["lora_parameters"]["keys"] == [
        "self_attn.q_proj", "mlp.down_proj"]

    dest = tmp_path / "saved"
    assert client.predict(str(adapter), str(dest), api_name="/save_adapter").startswith("Saved")
    assert (dest / "adapters.safetensors").read_bytes() == (adapter / "adapters.safetensors").read_bytes()
    assert "not empty" in client.predict(str(adapter), str(dest), api_name="/save_adapter")

    # model, adapter, template, system prompt, temperature, top-p, max tokens, seed, message, both chats so far
    base, tuned, _, _ = client.predict(str(tiny_model), str(adapter), "own", "", 0, 1, 8, 0, "the red cat", [], [],
                                       api_name="/chat")
    answers = [chat[-1]["content"][0]["text"] for chat in (base, tuned)]  # the answer's one text part
    assert all(a and not a.startswith("⚠️") for a in answers), answers


@pytest.mark.slow
def test_two_processes_from_the_app(app, tiny_model, text_data):
    """Start with 'N processes on this machine': mlx.launch runs 2 ranks, only rank 0 writes, the stats say so."""
    from gradio_client import Client

    url, runs_dir = app
    client = Client(url, verbose=False)
    wait_until(lambda: runs.active_run(runs_dir) is None, 60, "no other run to be training")
    settings = form(model=str(tiny_model), data=str(text_data), iters=4, steps_per_report=1, steps_per_eval=2,
                    save_every=2, batch_size=4, batching="padded", learning_rate=1e-3)
    here = "N processes on this machine"
    assert client.predict(*settings, here, 2, api_name="/command_preview").endswith("--nproc 2")
    refused = client.predict("dp-bad", *settings, here, 64, "", api_name="/start")
    assert "Processes: 64 is not between 2" in refused and not (runs_dir / "dp-bad").exists()
    started = client.predict("dp", *settings, here, 2, "", api_name="/start")
    assert "Started **dp** on 2 processes" in started

    run_dir = runs_dir / "dp"
    state = wait_until(lambda: (s := runs.run_state(run_dir)) and not s.alive and s, 300, "the run to end")
    assert state.status == "done", (run_dir / "train.log").read_text()[-3000:]
    # One writer: one adapter, one train event per step, and the choice recorded for Resume.
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapters", "best", "checkpoints", "config.json",
                                                        "events.jsonl", "launch.json", "train.log", "train.pid"]
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["adapter_config.json",
                                                                       "adapters.safetensors"]
    assert [e["step"] for e in runs.read_events(run_dir) if e["event"] == "train"] == [1, 2, 3, 4]
    assert (run_dir / "launch.json").read_text().strip() == '{"nproc": 2}'
    stats = client.predict(api_name="/poll")[1]
    assert f"**2 processes**: {socket.gethostname()} ×2" in stats


@pytest.mark.slow
def test_bad_inputs_get_messages_not_tracebacks(app, tmp_path):
    from gradio_client import Client

    client = Client(app[0], verbose=False)
    missing = tmp_path / "nope"
    assert "model folder not found" in client.predict(str(missing), api_name="/inspect")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "not valid JSON" in client.predict(str(broken), api_name="/inspect")
    assert "nothing to stop" in client.predict(api_name="/stop")
    assert "adapter folder not found" in client.predict(str(missing), str(tmp_path / "x"), api_name="/save_adapter")
    _, stats, _ = client.predict("demo", str(missing), "auto", 0.1, False, False, 2048, 4, "",
                                 api_name="/preview_data")
    assert stats.startswith("⚠️") and "nope" in stats


@pytest.mark.slow
def test_data_preview_fills_empty_probe_prompts_from_validation_rows(app, chat_data):
    from gradio_client import Client

    from lora_app.probes import row_prompt

    client = Client(app[0], verbose=False)
    first = json.loads((chat_data / "valid.jsonl").read_text().splitlines()[0])
    *_, prompts = client.predict("demo", str(chat_data), "auto", 0.1, False, False, 2048, 2, "",
                                 api_name="/preview_data")
    prompts = prompts.splitlines()
    assert 1 <= len(prompts) <= 3 and prompts[0] == row_prompt(first, "chat")
