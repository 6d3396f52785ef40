"""On a GPU the loop runs step 1 under a memory limit at the memory in use (so its peak is what a step needs, not
what the host allocated ahead of the GPU), then bounds the run-ahead at that peak plus a headroom, never above
the limit there was before; a user's memory_limit_gb is left alone. MLX's memory limit works the same on the CPU,
so these run the real loop here with the device reported as a GPU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import lora_app.run_ahead as run_ahead
from lora_app import trainer
from lora_app.config import RunConfig
from lora_app.objective import CrossEntropy
from lora_app.runs import RunFolderReporter, read_events
from lora_app.session import prepare


def train_as_on_a_gpu(model: Path, data: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                      **overrides: object) -> tuple[list[int], list[float], int]:
    """The limits the loop set, the losses it reported, and the limit left at the end."""
    cfg = RunConfig.from_flat({"model": str(model), "data": str(data), "batch_size": 2, "max_seq_length": 64,
                               "iters": 6, "steps_per_report": 1, "steps_per_eval": 0, "save_every": 10**6,
                               **overrides})
    run_dir.mkdir()
    process_limit = mx.get_memory_limit()  # put back at the end: the limit is process-wide
    session = prepare(run_dir, cfg, False, RunFolderReporter(run_dir))
    limits: list[int] = []
    real_set = mx.set_memory_limit
    with monkeypatch.context() as patch:
        patch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
        patch.setattr(mx, "set_memory_limit", lambda n: (limits.append(n), real_set(n))[1])
        session.started = time.perf_counter()
        try:
            trainer.train(session, CrossEntropy(session.head), RunFolderReporter(run_dir), trainer.Control(run_dir))
        finally:
            left = real_set(process_limit)
    losses = [e["loss"] for e in read_events(run_dir) if e["event"] == "train"]
    return limits, losses, left


def test_step_1_runs_tight_then_the_bound_leaves_headroom(tiny_model, text_data, tmp_path, monkeypatch) -> None:
    original = mx.get_memory_limit()
    limits, losses, left = train_as_on_a_gpu(tiny_model, text_data, tmp_path / "gpu", monkeypatch)
    assert len(limits) == 2, limits
    tight, bound = limits
    assert tight < bound <= original  # the headroom over step 1's peak, capped by the limit there was before
    assert bound >= min(tight + run_ahead.RUN_AHEAD_HEADROOM, original)
    assert left == bound
    # the limits change when work runs, not what it computes
    from lora_app import memory

    monkeypatch.setattr(run_ahead, "RUN_AHEAD_HEADROOM", 1e15)
    monkeypatch.setattr(memory, "available_memory", lambda: (0, "unknown"))  # no room to halve: the old limit binds
    limits_huge, same_losses, _ = train_as_on_a_gpu(tiny_model, text_data, tmp_path / "huge", monkeypatch)
    assert limits_huge[1] == original  # never raised above the limit there was before step 1
    assert same_losses == losses and len(losses) == 6


def test_a_user_set_limit_is_left_alone(tiny_model, text_data, tmp_path, monkeypatch) -> None:
    limits, losses, left = train_as_on_a_gpu(tiny_model, text_data, tmp_path / "user", monkeypatch,
                                             memory_limit_gb=3.5)
    assert limits == [] and left == int(3.5e9) and len(losses) == 6


def test_the_headroom_stops_at_the_memory_the_machine_gives(tiny_model, text_data, tmp_path, monkeypatch) -> None:
    """A machine that gives the GPU no more than the memory in use before step 1 (a 16 GB Mac training an 8B
    model near its working set): the limit after step 1 is what a step needs, without the headroom."""
    from lora_app import memory

    original = mx.get_memory_limit()
    limits, _, _ = train_as_on_a_gpu(tiny_model, text_data, tmp_path / "roomy", monkeypatch)
    monkeypatch.setattr(memory, "available_memory", lambda: (limits[0], "test"))
    tight_limits, losses, _ = train_as_on_a_gpu(tiny_model, text_data, tmp_path / "tight", monkeypatch)
    tight, bound = tight_limits
    assert tight < bound < min(tight + run_ahead.RUN_AHEAD_HEADROOM, original)
    assert len(losses) == 6


def test_the_headroom_is_at_most_half_the_room_left(tiny_model, text_data, tmp_path, monkeypatch) -> None:
    """A machine whose GPU memory ends exactly at the roomy bound (a 16 GB Mac near its working set): the run keeps
    half of what is left beyond a step's need free instead of running ahead into all of it."""
    from lora_app import memory

    limits, _, _ = train_as_on_a_gpu(tiny_model, text_data, tmp_path / "roomy", monkeypatch)
    tight, roomy = limits
    monkeypatch.setattr(memory, "available_memory", lambda: (roomy, "test"))
    near_limits, losses, _ = train_as_on_a_gpu(tiny_model, text_data, tmp_path / "near", monkeypatch)
    assert tight < near_limits[1] < roomy - run_ahead.RUN_AHEAD_HEADROOM / 4 and len(losses) == 6


GRAPH_VAR = "MLX_MAX_MB_PER_BUFFER"


@pytest.mark.parametrize("given", [None, "7"])
def test_the_training_cli_caps_mlx_cuda_graphs(given, engine_env, tmp_path) -> None:
    """`python -m lora_app train` sets MLX's CUDA graph size (run_ahead.GRAPH_MB) before MLX starts, unless the user
    chose one; here a config that does not exist ends the command right after."""
    env = {k: v for k, v in engine_env.items() if k != GRAPH_VAR} | ({GRAPH_VAR: given} if given else {})
    code = ("import os, sys; from lora_app.__main__ import main; code = main(sys.argv[1:]); "
            f"print(code, os.environ.get({GRAPH_VAR!r}))")
    out = subprocess.run([sys.executable, "-c", code, "train", "--config", str(tmp_path / "missing.json")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", given or str(run_ahead.GRAPH_MB)], out.stderr[-2000:]


def test_metal_keeps_its_own_command_buffer_size(monkeypatch) -> None:
    monkeypatch.setattr(run_ahead.platform, "system", lambda: "Darwin")
    environ: dict[str, str] = {}
    run_ahead.set_graph_size(environ)
    assert environ == {}
