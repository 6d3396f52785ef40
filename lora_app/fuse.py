"""Fuse an adapter into its base: a full model folder that `mlx_lm.load` reads, with no adapter needed.

Uses mlx-lm's pieces (LoRALinear.fuse, dequantize_model, save) as `mlx_lm.fuse` does, but loads the adapter
through our loader (ours, mlx-lm's or PEFT) and writes through export.new_folder (never overwrites).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fuse_adapter(adapter_dir: Path, out: Path, model: str | None = None, dequantize: bool = False) -> Path:
    """Merge the adapter into the base weights and write the model folder `out` (config, tokenizer, weights).

    A quantized base stays quantized (the merged weights are re-quantized, which rounds away part of a small
    update) unless `dequantize`, which writes float weights: the exact merge, and what GGUF export needs."""
    from mlx_lm.utils import save

    from .adapters import load_adapter
    from .export import ExportError, base_model_of, new_folder
    from .models import load_model, resolve_model

    base = model or base_model_of(adapter_dir)
    if not base:
        raise ExportError(f"{adapter_dir}: the adapter config does not name its base model; pass --model BASE")
    path = resolve_model(base)
    mlx_model, tokenizer = load_model(path, dequantize=False)
    load_adapter(mlx_model, Path(adapter_dir))
    merge(mlx_model, dequantize)
    config = model_config(path, dequantize)
    with new_folder(out) as tmp:
        save(tmp, path, mlx_model, tokenizer, config, donate_model=False)
    return Path(out)


def merge(model: Any, dequantize: bool) -> None:
    """Replace every LoRALinear by its fused linear (mlx-lm's fuse); de-quantize the rest if asked."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)


def model_config(path: str, dequantize: bool) -> dict:
    """The base's config.json (from the hub cache for a repo id), without quantization when de-quantized."""
    from mlx_lm.utils import hf_repo_to_path, load_config

    folder = Path(path) if Path(path).exists() else Path(hf_repo_to_path(path))
    config = load_config(folder)
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return config
