"""Checkpoints for exact resume: checkpoints/step_NNNNNNN/{adapters,optimizer}.safetensors + state.json.

A checkpoint is written into a hidden temporary folder and renamed into place when complete, so a folder
named step_* is always whole; state.json (written last) is the mark of a good checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .fileio import atomic_write_json, fsync_dir, fsync_file

PREFIX = "step_"


class CheckpointError(ValueError):
    """A run's checkpoints exist but none can be resumed from; one line naming each and why."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, adapter_weights: dict, optimizer_state: dict, state: dict,
                    keep: int) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "adapters.safetensors"), adapter_weights)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))
    for written in (tmp / "adapters.safetensors", tmp / "optimizer.safetensors"):
        fsync_file(written)  # on disk before state.json marks the checkpoint good (power loss, not only kills)
    atomic_write_json(tmp / "state.json", {"step": step, **state})
    fsync_dir(tmp)
    if final.exists():  # a re-save of the same step: move the old one aside whole, never delete it in place
        shutil.rmtree(root / f".old-{final.name}", ignore_errors=True)
        final.rename(root / f".old-{final.name}")
    tmp.rename(final)
    fsync_dir(root)
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (always at least the newest) and clear leftovers of torn saves."""
    found = checkpoint_dirs(run_dir)
    for old in found[: max(len(found) - max(keep, 1), 0)]:
        # Hide it first: a crash mid-delete must not leave a step_* folder with state.json but no weights.
        hidden = old.with_name(f".old-{old.name}")
        shutil.rmtree(hidden, ignore_errors=True)
        old.rename(hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for junk in [*root.glob(f".tmp-{PREFIX}*"), *root.glob(f".old-{PREFIX}*")]:
        shutil.rmtree(junk, ignore_errors=True)


def discard_from(run_dir: Path, step: int) -> Path | None:
    """Delete the checkpoints at `step` and later (weights known to give a non-finite loss); return the newest
    one left, or None."""
    for bad in checkpoint_dirs(run_dir):
        if int(bad.name[len(PREFIX):]) >= step:
            hidden = bad.with_name(f".old-{bad.name}")
            shutil.rmtree(hidden, ignore_errors=True)
            bad.rename(hidden)
            shutil.rmtree(hidden, ignore_errors=True)
    return latest_checkpoint(run_dir)


def roll_back(run_dir: Path, bad_step: int, adapter_config: dict) -> Path | None:
    """After a non-finite loss at `bad_step`: its loss was computed from the weights saved after bad_step - 1, so
    resuming those would repeat it. Drop the checkpoints from bad_step - 1 on and put the newest good one back into
    adapters/ (or remove adapters/ when none is left); returns that checkpoint or None."""
    from .adapters import save_adapter

    last = discard_from(run_dir, bad_step - 1)
    folder = Path(run_dir) / "adapters"
    if last is None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        weights, _, state = load_checkpoint(last)
        save_adapter(None, folder, {**adapter_config, "step": state["step"]}, weights)
    return last


def load_checkpoint(path: Path) -> tuple[dict, dict, dict[str, Any]]:
    """(adapter weights, optimizer state tree, state.json) of one checkpoint."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError("state.json has no step number")
    adapters = mx.load(str(path / "adapters.safetensors"))
    # Weights that are NaN or inf would fail the first step, and the loss check would blame the learning rate.
    if not all(mx.isfinite(v).all().item() for v in adapters.values()):
        raise CheckpointError("its adapter weights are not finite (NaN or inf)")
    optimizer = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    return adapters, optimizer, state
