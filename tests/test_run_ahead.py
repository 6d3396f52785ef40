"""On MLX's CUDA backend the `train` command bounds the run-ahead with small CUDA graphs (lora_app/run_ahead.py),
set before MLX is imported. This machine has no CUDA; a package's metadata named like MLX's CUDA backend stands in
for it, since that is what the check reads: these run real processes and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lora_app import run_ahead
from lora_app.runs import read_events, run_state

PROBE = ("import json, os, sys; from lora_app.run_ahead import use_small_graphs; on = use_small_graphs(); "
         "print(json.dumps([on, os.environ.get('MLX_MAX_OPS_PER_BUFFER'), os.environ.get('LORA_APP_SMALL_GRAPHS')]))")


def fake_mlx_cuda(folder: Path) -> Path:
    """A folder whose only content is the installed-package record of an mlx-cuda-13 wheel."""
    info = folder / "mlx_cuda_13-0.32.4.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-cuda-13\nVersion: 0.32.4\n")
    return folder


def probe(engine_env: dict, extra_path: Path | None = None, before: str = "", **env: str) -> list:
    """use_small_graphs() in a fresh process: [its answer, MLX_MAX_OPS_PER_BUFFER, LORA_APP_SMALL_GRAPHS] after."""
    e = {k: v for k, v in engine_env.items() if k not in ("MLX_MAX_OPS_PER_BUFFER", "LORA_APP_SMALL_GRAPHS")}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path or ""), e.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", before + PROBE], env={**e, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_small_graphs_only_on_mlx_cuda_and_only_where_the_user_set_no_size(engine_env, tmp_path) -> None:
    cuda = fake_mlx_cuda(tmp_path / "site")
    size = str(run_ahead.KERNELS_PER_GRAPH)
    assert probe(engine_env, cuda) == [True, size, "1"]
    assert probe(engine_env) == [False, None, None]  # this machine's MLX: the CPU backend
    assert probe(engine_env, cuda, MLX_MAX_OPS_PER_BUFFER="20") == [False, "20", None]  # the user's own size
    # too late once MLX is imported: its GPU stream may have read the variable already
    assert probe(engine_env, cuda, before="import mlx.core; ") == [False, None, None]
    # a process that a distributed run launched inherits the size and knows it was chosen here
    assert probe(engine_env, cuda, MLX_MAX_OPS_PER_BUFFER=size, LORA_APP_SMALL_GRAPHS="1") == [True, size, "1"]


def test_the_cli_does_not_import_mlx_before_the_train_command_chose(engine_env) -> None:
    code = "import sys, lora_app.__main__; print('mlx.core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=engine_env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_train_command_runs_under_small_graphs(engine_env, tiny_model, text_data, tmp_path) -> None:
    env = {**engine_env, "PYTHONPATH": os.pathsep.join([str(fake_mlx_cuda(tmp_path / "site")),
                                                        engine_env["PYTHONPATH"]])}
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "lora_app", "train", "--model", str(tiny_model), "--data", str(text_data),
                    "--iters", "2", "--batch-size", "2", "--max-seq-length", "64", "--steps-per-eval", "0",
                    "--out", str(run_dir)], env=env, check=True, capture_output=True, timeout=300)
    notes = [e["message"] for e in read_events(run_dir) if e["event"] == "info"]
    assert f"run-ahead bounded by CUDA graphs of {run_ahead.KERNELS_PER_GRAPH} kernels" in " ".join(notes)
    assert run_state(run_dir).status == "done"
