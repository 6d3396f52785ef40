"""Adapter folders in mlx-lm's layout: adapters.safetensors + adapter_config.json, written atomically.

The config holds what mlx-lm reads (fine_tune_type, num_layers, lora_parameters{rank, scale, dropout, keys})
plus our own section `lora_app` (alpha, block indices, modules, base model), so every mlx-lm tool reads our
adapters and we read theirs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import LoraConfig
from .fileio import atomic_write, atomic_write_json
from .lora import LoraError, LoraTargets, adapter_tensors, apply_lora

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter that does not fit; the message says exactly what does not match."""


def adapter_config(lora: LoraConfig, targets: LoraTargets, num_blocks: int, base_model: str) -> dict:
    """adapter_config.json contents. mlx-lm can express 'the last N blocks' (num_layers + in-block keys);
    any other block set is written as full module paths, which mlx-lm's loader also accepts."""
    last_n = targets.blocks == list(range(num_blocks - len(targets.blocks), num_blocks))
    keys = targets.modules if last_n else targets.module_paths()
    return {
        "fine_tune_type": "lora",
        "model": base_model,
        "num_layers": len(targets.blocks) if last_n else num_blocks,
        "lora_parameters": {"rank": lora.rank, "scale": lora.alpha / lora.rank, "dropout": lora.dropout,
                            "keys": keys},
        "lora_app": {"alpha": lora.alpha, "blocks": targets.blocks, "modules": targets.modules,
                     "base_model": base_model, "num_blocks": num_blocks},
    }


def save_adapter(model: Any, folder: Path, config: dict, weights: dict | None = None) -> Path:
    """Write the adapter folder; each file is replaced atomically (a crash leaves the old or the new one)."""
    import mlx.core as mx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_tensors(model) if weights is None else weights
    atomic_write(folder / ADAPTER_FILE, lambda p: mx.save_safetensors(str(p), weights))
    atomic_write_json(folder / CONFIG_FILE, config)
    return folder


def read_adapter_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} (expected an mlx-lm adapter folder)")
    if not (folder / ADAPTER_FILE).is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if config.get("fine_tune_type", "lora") != "lora":
        raise AdapterError(f"{path}: fine_tune_type {config.get('fine_tune_type')!r} is not supported (only lora)")
    if not isinstance(config.get("lora_parameters"), dict) or "rank" not in config["lora_parameters"]:
        raise AdapterError(f"{path}: lora_parameters with rank and scale missing")
    return config


def lora_config_from(config: dict, num_blocks: int) -> LoraConfig:
    """Our LoraConfig for an adapter config written by us or by mlx_lm.lora."""
    params = config["lora_parameters"]
    rank = int(params["rank"])
    ours = config.get("lora_app")
    if ours:
        return LoraConfig(rank=rank, alpha=float(ours["alpha"]), dropout=float(params.get("dropout", 0.0)),
                          modules=list(ours["modules"]), layers=",".join(str(b) for b in ours["blocks"]))
    keys = params.get("keys") or []
    full = [k for k in keys if k.startswith("model.layers.")]
    if full:  # full paths: model.layers.<b>.<module>
        blocks = sorted({int(k.split(".")[2]) for k in full})
        modules = sorted({k.split(".", 3)[3] for k in full})
        layers = ",".join(map(str, blocks))
    else:
        n = int(config.get("num_layers", num_blocks))
        layers = "all" if n <= 0 or n >= num_blocks else f"last:{n}"
        modules = list(keys)  # empty: mlx-lm adapted every linear module; resolved below
    return LoraConfig(rank=rank, alpha=float(params["scale"]) * rank, dropout=float(params.get("dropout", 0.0)),
                      modules=modules, layers=layers)


def load_adapter(model: Any, folder: Path) -> tuple[LoraConfig, LoraTargets]:
    """Apply the adapter's LoRA layers to `model` and load its weights, after checking every name and shape."""
    import mlx.core as mx

    from .models import blocks_of, linear_modules
    from .peft_format import is_peft_folder, load_peft

    folder = Path(folder)
    if is_peft_folder(folder):  # Hugging Face PEFT layout: converted, then the same name/shape checks
        return load_peft(model, folder)
    config = read_adapter_config(folder)
    num_blocks = len(blocks_of(model))
    lora = lora_config_from(config, num_blocks)
    if not lora.modules:
        lora.modules = list(linear_modules(blocks_of(model)[0]))
    try:
        targets = apply_lora(model, lora)
    except LoraError as e:
        base = config.get("lora_app", {}).get("base_model") or config.get("model", "another model")
        raise AdapterError(f"{folder}: adapter does not fit this model ({e}); it was made for {base}") from None
    weights = read_tensors(folder / ADAPTER_FILE)
    check_weights(weights, adapter_tensors(model), folder, config)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return lora, targets


def adapter_folder(path: str | Path) -> Path:
    """An adapter folder, given as the folder or as the path of its weights file."""
    path = Path(path).expanduser()
    return path.parent if path.suffix == ".safetensors" else path


def init_from_adapter(model: Any, path: str | Path, lora: LoraConfig, targets: LoraTargets,
                      base_model: str = "") -> tuple[Path, list[str]]:
    """Load an adapter's weights into `model`, which already has this run's LoRA layers (`lora`, `targets`), to
    continue training it. Rank, blocks and modules must match, and every tensor's name and shape; returns the
    folder and warnings (a different scale or base model name)."""
    import mlx.core as mx

    from .lora import resolve_targets
    from .models import blocks_of, linear_modules
    from .peft_format import PEFT_WEIGHTS, from_peft_tensors, is_peft_folder, peft_lora_config, read_peft_config

    folder = adapter_folder(path)
    try:
        if is_peft_folder(folder):  # converted to mlx-lm names and orientation, then the same checks
            config = read_peft_config(folder)
            weights = from_peft_tensors(read_tensors(folder / PEFT_WEIGHTS), folder)
            theirs = peft_lora_config(config, weights, folder)
            base = config.get("base_model_name_or_path") or ""
        else:
            config = read_adapter_config(folder)
            weights = read_tensors(folder / ADAPTER_FILE)
            theirs = lora_config_from(config, len(blocks_of(model)))
            theirs.modules = theirs.modules or list(linear_modules(blocks_of(model)[0]))
            base = config.get("lora_app", {}).get("base_model") or config.get("model") or ""
    except AdapterError as e:
        raise AdapterError(f"init_adapter: {e}") from None
    made_for = f"made for {base}" if base else "base model unknown"
    try:
        wanted = resolve_targets(model, theirs)
    except LoraError as e:
        raise AdapterError(f"init_adapter {folder}: the adapter does not fit this model ({e}); {made_for}") from None
    problems = []
    if theirs.rank != lora.rank:
        problems.append(f"rank {theirs.rank} (this run: {lora.rank})")
    if wanted.blocks != targets.blocks:
        problems.append(f"blocks {wanted.blocks} (this run: {targets.blocks})")
    if wanted.modules != targets.modules:
        problems.append(f"modules {', '.join(wanted.modules)} (this run: {', '.join(targets.modules)})")
    if problems:
        raise AdapterError(f"init_adapter {folder}: the adapter has {'; '.join(problems)}; set this run's rank, "
                           "modules and layers to the adapter's, or start without init_adapter")
    expected = adapter_tensors(model)
    try:
        check_weights(weights, expected, folder, {"lora_parameters": {"rank": theirs.rank}, "model": base})
    except AdapterError as e:  # one line: the first mismatch and how many more
        head, *lines = str(e).splitlines()
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise AdapterError(f"init_adapter {head} {lines[0].strip() if lines else ''}{more}") from None
    model.load_weights([(k, w.astype(expected[k].dtype)) for k, w in weights.items()], strict=False)
    mx.eval(model.parameters())
    warnings = []
    if abs(theirs.alpha / theirs.rank - lora.alpha / lora.rank) > 1e-6 * (lora.alpha / lora.rank):
        warnings.append(f"init_adapter {folder}: the adapter was trained with scale {theirs.alpha / theirs.rank:g} "
                        f"(alpha {theirs.alpha:g}), this run uses {lora.alpha / lora.rank:g} (alpha {lora.alpha:g}), "
                        "so it does not start from the adapter's model")
    if base and base_model and same_place(base) != same_place(base_model):
        warnings.append(f"init_adapter {folder}: the adapter was made for {base}; this run trains {base_model}")
    return folder, warnings


def read_tensors(path: Path) -> dict:
    import mlx.core as mx

    try:
        return mx.load(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise AdapterError(f"{path}: cannot be read ({e})") from None


def same_place(name: str) -> str:
    """A model name for comparison: paths resolved (a repo id stays as it is)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def check_weights(weights: dict, expected: dict, folder: Path, config: dict) -> None:
    problems = []
    for name in sorted(set(expected) - set(weights)):
        problems.append(f"{name}: missing from {ADAPTER_FILE}")
    for name in sorted(set(weights) - set(expected)):
        problems.append(f"{name}: no such LoRA parameter in this model")
    for name in sorted(set(weights) & set(expected)):
        got, want = tuple(weights[name].shape), tuple(expected[name].shape)
        if got != want:
            problems.append(f"{name}: adapter has shape {got}, this model and rank need {want}")
    if problems:
        base = config.get("lora_app", {}).get("base_model") or config.get("model") or "unknown"
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise AdapterError(
            f"{folder}: adapter does not match this model (rank {config['lora_parameters']['rank']}, "
            f"made for {base}):\n  " + "\n  ".join(shown)
        )
