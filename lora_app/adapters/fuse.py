"""Fuse an adapter into its base: the merged model that export.py writes as a folder `mlx_lm.load` reads alone.

Uses mlx-lm's pieces (LoRALinear.fuse, dequantize_model) as `mlx_lm.fuse` does, but loads the adapter through
our loader, so ours, mlx-lm's and PEFT adapters all fuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models import load_model, resolve_model
from .loader import load_adapter


def fused_model(adapter_dir: Path, base: str, dequantize: bool) -> tuple[Any, Any, str, dict]:
    """(model, tokenizer, base path, config.json contents) of `base` with the adapter merged into its weights.

    A quantized base stays quantized (the merged weights are re-quantized, which rounds away part of a small
    update) unless `dequantize`, which gives float weights: the exact merge, and what GGUF export needs."""
    path = resolve_model(base)
    model, tokenizer = load_model(path, dequantize=False)
    load_adapter(model, Path(adapter_dir))
    merge(model, dequantize)
    return model, tokenizer, path, model_config(path, dequantize)


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
