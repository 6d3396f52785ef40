"""Hugging Face PEFT's LoRA layout: export our adapters to it, and load PEFT adapters into our models.

PEFT stores `base_model.model.<module path>.lora_A.weight` as [rank, in] and `lora_B.weight` as [out, rank]
(the seed's orientation); mlx-lm stores the transposes (`lora_a` [in, rank], `lora_b` [rank, out]).
PEFT scales by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), which must equal our scale.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .adapters import ADAPTER_FILE, CONFIG_FILE, AdapterError, check_weights, read_adapter_config, read_tensors
from .config import LoraConfig
from .fileio import atomic_write, atomic_write_json
from .lora import LoraError, LoraTargets, adapter_tensors, apply_lora

PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT key -> (module path, A|B); files saved by PEFT drop the adapter name, some tools keep it (".default").
PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
BLOCK = re.compile(r"\.layers\.(\d+)\.")


def is_peft_folder(folder: Path) -> bool:
    folder = Path(folder)
    has_weights = (folder / PEFT_WEIGHTS).is_file() or (folder / "adapter_model.bin").is_file()
    return has_weights and not (folder / ADAPTER_FILE).is_file()


# ---- export ------------------------------------------------------------------------------------------------

def export_peft(adapter_dir: Path, out: Path, base_model: str | None = None) -> Path:
    """Write `out`/adapter_model.safetensors + adapter_config.json from our (or mlx-lm's) adapter folder."""
    import mlx.core as mx

    from .export import ExportError, base_model_of, new_folder

    if is_peft_folder(adapter_dir):
        raise ExportError(f"{adapter_dir}: already a PEFT adapter; copy the folder instead")
    config = read_adapter_config(adapter_dir)
    weights = read_tensors(Path(adapter_dir) / ADAPTER_FILE)  # a torn file: one line, and nothing is written
    tensors = to_peft_tensors(weights, adapter_dir)
    try:
        peft_config = peft_config_for(config, weights, base_model or base_model_of(adapter_dir))
    except (KeyError, TypeError, ValueError) as e:  # a hand-edited config: rank, scale or alpha not numbers
        raise AdapterError(f"{Path(adapter_dir) / CONFIG_FILE}: lora_parameters need numeric rank and scale "
                           f"({type(e).__name__}: {e})") from None
    with new_folder(out) as tmp:
        atomic_write(tmp / PEFT_WEIGHTS, lambda p: mx.save_safetensors(str(p), tensors, metadata={"format": "pt"}))
        atomic_write_json(tmp / CONFIG_FILE, peft_config)
    return Path(out)


def to_peft_tensors(weights: dict[str, Any], folder: Path) -> dict[str, Any]:
    """mlx-lm names and orientation -> PEFT's: `<path>.lora_a` [in, r] -> `...<path>.lora_A.weight` [r, in]."""
    out = {}
    for name, w in sorted(weights.items()):
        path, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b"):
            raise AdapterError(f"{folder}: {name} is not a LoRA tensor (only plain LoRA exports to PEFT)")
        out[f"{PREFIX}{path}.lora_{kind[-1].upper()}.weight"] = w.T
    return out


def peft_config_for(config: dict, weights: dict[str, Any], base_model: str | None) -> dict:
    """adapter_config.json for PEFT; blocks and modules come from the tensors, so mlx-lm's adapters work too."""
    params = config["lora_parameters"]
    rank = int(params["rank"])
    ours = config.get("lora_app") or {}
    alpha = float(ours.get("alpha", float(params["scale"]) * rank))
    paths = {name.rpartition(".")[0] for name in weights}
    blocks = sorted({int(m.group(1)) for p in paths if (m := BLOCK.search(p))})
    all_blocks = "num_blocks" in ours and blocks == list(range(int(ours["num_blocks"])))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
        "layers_to_transform": None if all_blocks else blocks, "layers_pattern": None if all_blocks else "layers",
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


# ---- import ------------------------------------------------------------------------------------------------

def read_peft_config(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} (expected a PEFT adapter folder)")
    if not (folder / PEFT_WEIGHTS).is_file():
        raise AdapterError(f"{folder}: no {PEFT_WEIGHTS} (PEFT's pickled adapter_model.bin is not read; "
                           "save the adapter with safe_serialization=True)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if unsupported:
        raise AdapterError(f"{path}: PEFT options not supported here: {', '.join(unsupported)}")
    return config


def from_peft_tensors(tensors: dict[str, Any], folder: Path) -> dict[str, Any]:
    """PEFT names and orientation -> mlx-lm's (the inverse of to_peft_tensors)."""
    out, bad = {}, []
    for name, w in tensors.items():
        m = PEFT_KEY.match(name)
        if m is None:
            bad.append(name)
            continue
        out[f"{m['path']}.lora_{m['ab'].lower()}"] = w.T
    if bad:
        raise AdapterError(f"{folder / PEFT_WEIGHTS}: tensors that are not LoRA A/B weights (e.g. embeddings, "
                           f"DoRA): {', '.join(sorted(bad)[:5])}")
    return out


def peft_lora_config(config: dict, weights: dict[str, Any], folder: Path) -> LoraConfig:
    """Our LoraConfig: rank and scale from the config (checked against the tensors), targets from the tensors."""
    rank = int(config.get("r", 8))
    ranks = {tuple(w.shape)[1] for name, w in weights.items() if name.endswith(".lora_a")}
    if ranks != {rank}:
        raise AdapterError(f"{folder}: {CONFIG_FILE} says r={rank} but the tensors have rank "
                           f"{', '.join(map(str, sorted(ranks))) or 'none'}")
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    paths = sorted({name.rpartition(".")[0] for name in weights})
    located = [(m.group(1), p[m.end():]) for p in paths if (m := BLOCK.search(p))]
    if len(located) != len(paths):
        raise AdapterError(f"{folder}: LoRA on modules outside the model's blocks is not supported")
    blocks = sorted({int(b) for b, _ in located})
    modules = sorted({module for _, module in located})
    return LoraConfig(rank=rank, alpha=scale * rank, dropout=float(config.get("lora_dropout", 0.0)),
                      modules=modules, layers=",".join(map(str, blocks)))


def load_peft(model: Any, folder: Path) -> tuple[LoraConfig, LoraTargets]:
    """Apply a PEFT LoRA adapter to `model` (mlx-lm LoRALinear layers), with the same checks as load_adapter."""
    import mlx.core as mx

    folder = Path(folder)
    config = read_peft_config(folder)
    weights = from_peft_tensors(read_tensors(folder / PEFT_WEIGHTS), folder)
    lora = peft_lora_config(config, weights, folder)
    base = config.get("base_model_name_or_path") or "another model"
    try:
        targets = apply_lora(model, lora)
    except LoraError as e:
        raise AdapterError(f"{folder}: adapter does not fit this model ({e}); it was made for {base}") from None
    expected = adapter_tensors(model)
    check_weights(weights, expected, folder, {"lora_parameters": {"rank": lora.rank}, "model": base})
    model.load_weights([(k, w.astype(expected[k].dtype)) for k, w in weights.items()], strict=False)
    mx.eval(model.parameters())
    return lora, targets
