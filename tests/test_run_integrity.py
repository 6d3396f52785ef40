"""Run folders under attack and under accident: run names that point outside the runs folder, two trainers on
one run, a resume whose checkpoints cannot be read, Stop during evaluation and probes (issue 23, defects 2, 4,
5, 6 and 8)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import pytest
from runhelp import cli, final_status, finish, form_values, hash_tree, make_run, start, wait_for_step

from lora_app import runs
from lora_app.checkpoints import checkpoint_dirs
from lora_app.config import RunConfig
from lora_app.trainer import run
from lora_app.ui import runs_step, train_step
from lora_app.ui.context import Context
from lora_app.ui.engine import wait_for
from lora_app.ui.settings import config_to_form

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request


# ---- run names from the page -----------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path: Path) -> dict:
    """A runs folder, a run-like folder outside it (and a link to it from inside), a file a name could reach."""
    runs_dir, elsewhere = tmp_path / "runs", tmp_path / "outside"
    runs_dir.mkdir()
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text(json.dumps({"model": "secret-model", "data": "d", "iters": 5}))
    (elsewhere / "train.log").write_text("secret log line\n")
    (elsewhere / "control").write_text("keep me")
    (runs_dir / "link").symlink_to(elsewhere)
    victim = tmp_path / "victim.yaml"
    victim.write_text("keep: me\n")
    # A name that export_run_yaml's temporary folder joins into the victim's path.
    up = "../" * len(Path(tempfile.gettempdir()).resolve().parts)
    into_victim = up + str(victim.with_suffix("")).lstrip("/")
    names = ["../outside", str(elsewhere), "link", "..", "a/../../outside", "x" * 300, into_victim]
    return {"ctx": Context(runs_dir), "elsewhere": elsewhere, "victim": victim, "names": names,
            "hashes": hash_tree(elsewhere)}


def test_the_resolver_refuses_every_name_outside_the_runs_folder(outside) -> None:
    for name in outside["names"]:
        with pytest.raises(runs.RunError):
            runs.resolve_run(outside["ctx"].runs_dir, name)
    (outside["ctx"].runs_dir / "mine").mkdir()
    assert runs.resolve_run(outside["ctx"].runs_dir, "mine") == (outside["ctx"].runs_dir / "mine").resolve()
    assert [s.name for s in runs.list_runs(outside["ctx"].runs_dir)] == []  # the link's run is not listed


def test_endpoints_neither_read_nor_write_outside_the_runs_folder(outside, monkeypatch) -> None:
    ctx, started = outside["ctx"], []
    monkeypatch.setattr(runs, "start_training", lambda *a, **k: started.append(a))
    for name in outside["names"]:
        assert runs_step.open_run(ctx, name)[1].startswith("⚠️"), name
        assert runs_step.export_run_yaml(ctx, name) is None, name
        shown = train_step.poll(ctx, name, None)
        assert "secret" not in repr(shown), name
        assert runs_step.compare(ctx, [name, "link"], "step", False, 0.0)[2] is None, name
        assert train_step.resume_run(ctx, name)[1].startswith("⚠️"), name
        assert train_step.control_run(ctx, name, "stop").startswith("⚠️"), name
    assert not started
    assert hash_tree(outside["elsewhere"]) == outside["hashes"]  # its control file was not deleted either
    assert outside["victim"].read_text() == "keep: me\n"


def test_a_run_name_too_long_is_one_clear_line(tmp_path, monkeypatch) -> None:
    started = []
    monkeypatch.setattr(runs, "start_training", lambda *a, **k: started.append(a))
    ctx = Context(tmp_path / "runs")
    name, message = train_step.start(ctx, "x" * 300, **form_values(model="/m", data="/d"))
    assert message == "⚠️ Run name: 300 characters; use at most 100"
    assert not started and not any((tmp_path / "runs").glob("*"))


def test_resume_refuses_a_config_it_cannot_use_on_the_page(tmp_path, monkeypatch) -> None:
    started = []
    monkeypatch.setattr(runs, "start_training", lambda *a, **k: started.append(a))
    ctx = Context(tmp_path / "runs")
    (ctx.runs_dir / "broken").mkdir(parents=True)
    (ctx.runs_dir / "broken" / "config.json").write_text(json.dumps({"model": "m", "data": "d", "rank": 0}))
    _, message = train_step.resume_run(ctx, "broken")
    assert message.startswith("⚠️ Resume broken: its config.json cannot be used (rank must be at least 1")
    assert not started


# ---- one trainer per run ---------------------------------------------------------------------------------

LONG = {"iters": 1_000_000, "save_every": 1_000_000, "steps_per_report": 1}


def stop_and_wait(run_dir: Path, proc) -> None:
    runs.request(run_dir, "stop")
    assert finish(proc) == 0
    assert final_status(run_dir) == "stopped"


@pytest.mark.slow
def test_a_second_trainer_on_a_run_is_refused(tiny_model, text_data, tmp_path, engine_env) -> None:
    run_dir = make_run(tmp_path / "run", tiny_model, text_data, **LONG)
    proc = start(run_dir)
    wait_for_step(run_dir, proc, 1)
    pid = (run_dir / "train.pid").read_text()
    result = cli(["train", "--resume", str(run_dir)], engine_env, timeout=60)
    assert result.returncode == 2, result.stderr[-1500:]
    assert result.stderr.strip().splitlines() == [
        f"error: run: another process is training this run (pid {pid}); stop or pause it first"]
    with pytest.raises(runs.RunError, match="another process is training this run"):
        runs.start_training(run_dir, resume=True)
    assert (run_dir / "train.pid").read_text() == pid and proc.poll() is None
    stop_and_wait(run_dir, proc)


@pytest.mark.slow
def test_starts_and_resumes_at_once_start_one_trainer(tiny_model, text_data, tmp_path) -> None:
    ctx = Context(tmp_path / "runs")
    values = form_values(**config_to_form(RunConfig.from_flat(
        {"model": str(tiny_model), "data": str(text_data), "batch_size": 2, "max_seq_length": 64,
         "steps_per_eval": 0, **LONG})))
    answers: list[str] = []

    def click(handler, *args, **kwargs) -> None:
        answers.append(handler(ctx, *args, **kwargs)[1])

    threads = [threading.Thread(target=click, args=(train_step.start, "same"), kwargs=values) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folders = sorted(p.name for p in ctx.runs_dir.iterdir())
    assert folders == ["same"], answers
    assert sum(a.startswith("⚠️ One run at a time: same is still training") for a in answers) == 2, answers
    run_dir = ctx.runs_dir / "same"
    proc_pid = int((run_dir / "train.pid").read_text())
    wait_for_step(run_dir, _Pid(proc_pid), 1)
    runs.request(run_dir, "pause")
    assert _wait_gone(proc_pid)
    assert final_status(run_dir) == "paused"

    answers.clear()
    threads = [threading.Thread(target=click, args=(train_step.resume_run, "same")) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a[:10] for a in answers) == sorted(["Resuming *", "⚠️ One run"]), answers
    pid = int((run_dir / "train.pid").read_text())
    paused_at = runs.run_state(run_dir).step
    wait_for_step(run_dir, _Pid(pid), paused_at + 1)  # the new process trains (it clears old requests first)
    runs.request(run_dir, "stop")
    assert _wait_gone(pid)
    assert final_status(run_dir) == "stopped"


class _Pid:
    """wait_for_step's view of a process this test did not start itself."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self) -> int | None:
        return None if runs.pid_alive(self.pid) else 0


def _wait_gone(pid: int, timeout: float = 120) -> bool:
    return wait_for(lambda: not runs.pid_alive(pid), timeout)


# ---- a resume that cannot resume -------------------------------------------------------------------------

@pytest.fixture
def finished(tiny_model, text_data, tmp_path) -> Path:
    """A finished run with adapters/, best/ and two checkpoints (steps 8 and 12)."""
    run_dir = make_run(tmp_path / "run", tiny_model, text_data, steps_per_eval=4)
    assert finish(start(run_dir)) == 0, (run_dir / "train.log").read_text()[-2000:]
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_0000008", "step_0000012"]
    return run_dir


def saved(run_dir: Path) -> dict:
    return {k: hash_tree(run_dir / k) for k in ("adapters", "best", "checkpoints")}


def test_unreadable_checkpoints_stop_the_resume_and_touch_nothing(finished, engine_env) -> None:
    for checkpoint in checkpoint_dirs(finished):
        (checkpoint / "adapters.safetensors").write_bytes(b"\0" * 10)
    before = saved(finished)
    result = cli(["train", "--resume", str(finished), "--iters", "16"], engine_env)
    assert result.returncode == 2, result.stderr[-1500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume run: none of its 2 checkpoint(s) can be "
                                                   "read (step_0000012: "), lines
    assert lines[0].endswith("nothing was changed")
    assert saved(finished) == before
    state = runs.run_state(finished)
    assert state.status == "error" and "none of its 2 checkpoint(s)" in state.message  # what the page shows


def write_nan_weights(checkpoint: Path) -> None:
    import mlx.core as mx

    weights = mx.load(str(checkpoint / "adapters.safetensors"))
    mx.save_safetensors(str(checkpoint / "adapters.safetensors"), {k: v * float("nan") for k, v in weights.items()})


@pytest.mark.slow
def test_a_nan_checkpoint_is_skipped_not_blamed_on_the_learning_rate(finished, engine_env) -> None:
    newest = checkpoint_dirs(finished)[-1]
    write_nan_weights(newest)
    assert finish(start(finished, resume=True, extra=["--iters", "16"])) == 0, (finished / "train.log").read_text()
    warned = [e["message"] for e in runs.read_events(finished) if e["event"] == "warning"]
    assert any("step_0000012 cannot be read (its adapter weights are not finite" in w for w in warned), warned
    resumed = [e for e in runs.read_events(finished) if e["event"] == "info" and "resumed" in e["message"]]
    assert resumed[-1]["step"] == 8 and final_status(finished) == "done"


@pytest.mark.slow
def test_all_nan_checkpoints_say_so(finished, engine_env) -> None:
    for checkpoint in checkpoint_dirs(finished):
        write_nan_weights(checkpoint)
    before = saved(finished)
    result = cli(["train", "--resume", str(finished), "--iters", "16"], engine_env)
    assert result.returncode == 2 and "adapter weights are not finite" in result.stderr, result.stderr[-1500:]
    assert "learning rate" not in result.stderr
    assert saved(finished) == before


def test_a_nan_loss_at_the_first_step_keeps_the_checkpoints(finished, tiny_model, tmp_path) -> None:
    """Weights that read back finite but overflow to a non-finite loss at once: the starting point is at fault,
    not the learning rate, and nothing is rolled back (the rollback would delete the checkpoint resumed from)."""
    import mlx.core as mx

    newest = checkpoint_dirs(finished)[-1]
    weights = mx.load(str(newest / "adapters.safetensors"))
    mx.save_safetensors(str(newest / "adapters.safetensors"),
                        {k: mx.full(v.shape, 3e38, v.dtype) for k, v in weights.items()})
    before = saved(finished)
    cfg = RunConfig.from_flat({**runs.read_config(finished), "iters": 16})
    assert run(finished, cfg, resume=True).status == "error"
    message = runs.run_state(finished).message
    assert "the first step of this process, before any update" in message and "step_0000012" in message
    assert "Lower the learning rate" not in message
    assert saved(finished) == before


# ---- Stop reaches evaluation and probes ------------------------------------------------------------------

def stopped_before(tiny_model, text_data, run_dir: Path, **overrides) -> list[dict]:
    """Run in-process with a stop asked for before it starts; its events."""
    cfg = RunConfig.from_flat({"model": str(tiny_model), "data": str(text_data), "batch_size": 2,
                               "max_seq_length": 64, "iters": 50, **overrides})
    run_dir.mkdir()
    runs.request(run_dir, "stop")
    assert run(run_dir, cfg).status == "stopped"
    return runs.read_events(run_dir)


def test_stop_ends_the_probes(tiny_model, text_data, tmp_path) -> None:
    events = stopped_before(tiny_model, text_data, tmp_path / "run", probe_prompts=["one", "two", "three"],
                            probe_max_tokens=200, steps_per_eval=0)
    kinds = [e["event"] for e in events]
    assert "sample" not in kinds and "train" not in kinds, kinds
    assert not (tmp_path / "run" / "adapters").exists()  # stopped at step 0: nothing trained, nothing saved


def test_stop_ends_an_evaluation(tiny_model, text_data, tmp_path) -> None:
    events = stopped_before(tiny_model, text_data, tmp_path / "run", steps_per_eval=1, val_batches=-1)
    assert "val" not in [e["event"] for e in events]
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped and stopped[-1]["step"] == 1
    assert json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())["step"] == 1


@pytest.mark.slow
def test_sigterm_reaches_the_trainer_during_probes(tiny_model, text_data, tmp_path) -> None:
    """The same through the signal the app and the OS send: a run busy with its first probes ends before their end."""
    import signal

    prompts = ["a", "b", "c", "d", "e"]
    run_dir = make_run(tmp_path / "run", tiny_model, text_data, probe_prompts=prompts, probe_max_tokens=2048, **LONG)
    proc = start(run_dir)
    assert wait_for(lambda: any(e["event"] == "sample" for e in runs.read_events(run_dir)), 60)
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc, timeout=60) == 0
    assert final_status(run_dir) == "stopped"
    assert len([e for e in runs.read_events(run_dir) if e["event"] == "sample"]) < len(prompts)
