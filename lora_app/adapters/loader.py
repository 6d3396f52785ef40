"""Write our adapter folders, and load any adapter folder into a model: apply its LoRA layers, check every
tensor's name and shape, then load the weights.

Our folders are mlx-lm's layout (adapters.safetensors + adapter_config.json, each written atomically) plus a
`lora_app` section, so every mlx-lm tool reads our adapters. Folders are read by reader.py (ours, mlx-lm's or
PEFT's, one settings object); PEFT tensors are converted to mlx-lm's names and orientation by peft.py first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import LoraConfig
from ..fileio import atomic_write, atomic_write_json
from ..lora import LoraError, LoraTargets, adapter_tensors, apply_lora, resolve_targets
from ..models import blocks_of, linear_modules
from .peft import from_peft_tensors
from .reader import ADAPTER_FILE, CONFIG_FILE, AdapterError, AdapterSettings, adapter_folder, read_adapter


def adapter_config(lora: LoraConfig, targets: LoraTargets, num_blocks: int, base_model: str) -> dict:
    """adapter_config.json contents. mlx-lm can express 'the last N blocks' (num_layers + in-block keys);
    any other block set is written as full module paths, which mlx-lm's loader also accepts."""
    last_n = targets.blocks == list(range(num_blocks - len(targets.blocks), num_blocks))
    keys = targets.modules if last_n else targets.module_paths()
    return {
        "fine_tune_type": lora.method,  # lora or dora: mlx-lm's loader builds the same layers
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


def load_adapter(model: Any, folder: Path) -> tuple[LoraConfig, LoraTargets]:
    """Apply the adapter's LoRA layers to `model` and load its weights, after checking every name and shape."""
    settings = read_adapter(folder)
    weights = read_weights(settings)  # before the model changes: a torn file leaves it as it was
    lora = lora_for(model, settings)
    try:
        targets = apply_lora(model, lora)
    except LoraError as e:
        raise AdapterError(f"{settings.folder}: adapter does not fit this model ({e}); it was made for "
                           f"{settings.base_model or 'another model'}") from None
    load_checked(model, weights, settings)
    return lora, targets


def init_from_adapter(model: Any, path: str | Path, lora: LoraConfig, targets: LoraTargets,
                      base_model: str = "") -> tuple[Path, list[str]]:
    """Load an adapter's weights into `model`, which already has this run's LoRA layers (`lora`, `targets`), to
    continue training it. Rank, blocks and modules must match, and every tensor's name and shape; returns the
    folder and warnings (a different scale or base model name)."""
    folder = adapter_folder(path)
    try:
        settings = read_adapter(folder)
        weights = read_weights(settings)
    except AdapterError as e:
        raise AdapterError(f"init_adapter: {e}") from None
    base = settings.base_model
    made_for = f"made for {base}" if base else "base model unknown"
    theirs = lora_for(model, settings)
    try:
        wanted = resolve_targets(model, theirs)
    except LoraError as e:
        raise AdapterError(f"init_adapter {folder}: the adapter does not fit this model ({e}); {made_for}") from None
    problems = target_differences(theirs, wanted, lora, targets)
    if problems:
        raise AdapterError(f"init_adapter {folder}: the adapter has {'; '.join(problems)}; set this run's rank, "
                           "modules and layers to the adapter's, or start without init_adapter")
    try:
        load_checked(model, weights, settings)
    except AdapterError as e:  # one line: the first mismatch and how many more
        head, *lines = str(e).splitlines()
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise AdapterError(f"init_adapter {head} {lines[0].strip() if lines else ''}{more}") from None
    return folder, init_warnings(folder, settings, lora, base_model)


def target_differences(theirs: LoraConfig, wanted: LoraTargets, lora: LoraConfig, targets: LoraTargets) -> list[str]:
    """What the adapter (`theirs`, resolved to `wanted`) has that this run's LoRA layers do not."""
    problems = []
    if theirs.rank != lora.rank:
        problems.append(f"rank {theirs.rank} (this run: {lora.rank})")
    if wanted.blocks != targets.blocks:
        problems.append(f"blocks {wanted.blocks} (this run: {targets.blocks})")
    if wanted.modules != targets.modules:
        problems.append(f"modules {', '.join(wanted.modules)} (this run: {', '.join(targets.modules)})")
    return problems


def init_warnings(folder: Path, settings: AdapterSettings, lora: LoraConfig, base_model: str) -> list[str]:
    """A different scale or base model still loads (the shapes fit), but the run does not start where the user
    may think it does."""
    warnings = []
    if abs(settings.scale - lora.alpha / lora.rank) > 1e-6 * (lora.alpha / lora.rank):
        warnings.append(f"init_adapter {folder}: the adapter was trained with scale {settings.scale:g} "
                        f"(alpha {settings.alpha:g}), this run uses {lora.alpha / lora.rank:g} (alpha {lora.alpha:g}), "
                        "so it does not start from the adapter's model")
    base = settings.base_model
    if base and base_model and same_place(base) != same_place(base_model):
        warnings.append(f"init_adapter {folder}: the adapter was made for {base}; this run trains {base_model}")
    return warnings


def lora_for(model: Any, settings: AdapterSettings) -> LoraConfig:
    """The adapter's LoraConfig for this model: mlx-lm's "every linear module" (no keys) and last:N past the
    model's blocks resolved against it."""
    blocks = blocks_of(model)
    lora = settings.lora_config(len(blocks))
    lora.modules = lora.modules or list(linear_modules(blocks[0]))
    return lora


def read_weights(settings: AdapterSettings) -> dict[str, Any]:
    """The adapter's tensors under mlx-lm's names and orientation, whichever tool wrote them."""
    weights = read_tensors(settings.weights)
    return from_peft_tensors(weights, settings.folder) if settings.kind == "peft" else weights


def read_tensors(path: Path) -> dict[str, Any]:
    import mlx.core as mx

    try:
        return mx.load(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise AdapterError(f"{path}: cannot be read ({e})") from None


def load_checked(model: Any, weights: dict[str, Any], settings: AdapterSettings) -> None:
    """Load `weights` into the model's LoRA layers after checking them all; cast to the layers' dtype, as a PEFT
    file may hold float16."""
    import mlx.core as mx

    expected = adapter_tensors(model)
    check_weights(weights, expected, settings)
    model.load_weights([(k, w.astype(expected[k].dtype)) for k, w in weights.items()], strict=False)
    mx.eval(model.parameters())


def check_weights(weights: dict[str, Any], expected: dict[str, Any], settings: AdapterSettings) -> None:
    problems = []
    for name in sorted(set(expected) - set(weights)):
        problems.append(f"{name}: missing from {settings.weights.name}")
    for name in sorted(set(weights) - set(expected)):
        problems.append(f"{name}: no such LoRA parameter in this model")
    for name in sorted(set(weights) & set(expected)):
        got, want = tuple(weights[name].shape), tuple(expected[name].shape)
        if got != want:
            problems.append(f"{name}: adapter has shape {got}, this model and rank need {want}")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise AdapterError(f"{settings.folder}: adapter does not match this model (rank {settings.rank}, made for "
                           f"{settings.base_model or 'unknown'}):\n  " + "\n  ".join(shown))


def same_place(name: str) -> str:
    """A model name for comparison: paths resolved (a repo id stays as it is)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
