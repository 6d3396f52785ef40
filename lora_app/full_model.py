"""Full fine-tuning's result as a model folder (`<run>/model`) that `mlx_lm.load` reads alone: config, tokenizer
and every weight, the trained blocks' included. Its adapters/ folder holds the trained weights only, in mlx-lm's
layout for `fine_tune_type: full` (mlx_lm.generate --adapter-path loads them onto the base)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

FOLDER = "model"


def save_model_folder(model: Any, tokenizer: Any, base: str, run_dir: Path) -> Path:
    """Write <run_dir>/model whole, then swap it in: a crash leaves the previous folder or none, never half."""
    from mlx_lm.utils import save

    from .adapters.fuse import model_config
    from .models import resolve_model

    path = resolve_model(base)
    out, tmp = Path(run_dir) / FOLDER, Path(run_dir) / f".{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp, path, model, tokenizer, model_config(path, dequantize=True), donate_model=False)
    old = Path(run_dir) / f".{FOLDER}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
