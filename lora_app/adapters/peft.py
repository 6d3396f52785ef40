"""Hugging Face PEFT's LoRA layout mapped to and from mlx-lm's: tensor names, orientation and adapter_config.json.

PEFT stores `base_model.model.<module path>.lora_A.weight` as [rank, in] and `lora_B.weight` as [out, rank]
(the seed's orientation); mlx-lm stores the transposes (`lora_a` [in, rank], `lora_b` [rank, out]).
PEFT scales by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), which must equal our scale.
Reading a PEFT folder is reader.py's job; loader.py loads it, export.py writes one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .reader import BLOCK, PEFT_WEIGHTS, AdapterError, AdapterSettings, mlx_name

PREFIX = "base_model.model."
MAGNITUDE = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


def to_peft_tensors(weights: dict[str, Any], folder: Path) -> dict[str, Any]:
    """mlx-lm names and orientation -> PEFT's: `<path>.lora_a` [in, r] -> `...<path>.lora_A.weight` [r, in];
    DoRA's magnitude `<path>.m` [out] -> `...<path>.lora_magnitude_vector` (PEFT's saved name)."""
    out = {}
    for name, w in sorted(weights.items()):
        theirs = peft_name(name)
        if theirs is None:
            raise AdapterError(f"{folder}: {name} is not a LoRA or DoRA tensor")
        out[theirs] = w if name.endswith(".m") else w.T
    return out


def peft_name(name: str) -> str | None:
    """PEFT's name for an mlx-lm adapter tensor (None: not a LoRA or DoRA tensor)."""
    path, _, kind = name.rpartition(".")
    if kind == "m":
        return f"{PREFIX}{path}.lora_magnitude_vector"
    if kind in ("lora_a", "lora_b"):
        return f"{PREFIX}{path}.lora_{kind[-1].upper()}.weight"
    return None


def from_peft_tensors(tensors: dict[str, Any], folder: Path) -> dict[str, Any]:
    """PEFT names and orientation -> mlx-lm's (the inverse of to_peft_tensors)."""
    out, bad = {}, []
    for name, w in tensors.items():
        magnitude = MAGNITUDE.match(name)
        if magnitude:  # DoRA's, 1-D: no transpose
            out[f"{magnitude['path']}.m"] = w
            continue
        ours = mlx_name(name)
        if ours is None:
            bad.append(name)
        else:
            out[ours] = w.T
    if bad:
        raise AdapterError(f"{folder / PEFT_WEIGHTS}: tensors that are not LoRA A/B weights (e.g. embeddings, "
                           f"DoRA): {', '.join(sorted(bad)[:5])}")
    return out


def peft_config_for(settings: AdapterSettings, weights: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    """adapter_config.json for PEFT; blocks and modules come from the tensors, so mlx-lm's adapters (which may
    adapt every linear module, unnamed) export too."""
    alpha = float(settings.alpha)
    paths = {name.rpartition(".")[0] for name in weights}
    dora = any(name.endswith(".m") for name in weights)
    blocks = sorted({int(m.group(1)) for p in paths if (m := BLOCK.search(p))})
    # PEFT's "every block" form only where the folder records the base's block count (ours)
    all_blocks = settings.num_blocks is not None and blocks == list(range(settings.num_blocks))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(settings.dropout),
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
        "layers_to_transform": None if all_blocks else blocks, "layers_pattern": None if all_blocks else "layers",
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": dora,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
