"""Read an adapter folder into one settings object: ours, mlx-lm's (mlx_lm.lora's output) or Hugging Face PEFT's.

Ours and mlx-lm's: adapters.safetensors + adapter_config.json with fine_tune_type, num_layers and
lora_parameters{rank, scale, dropout, keys}; ours adds a `lora_app` section (alpha, blocks, modules, base model)
that says the same more exactly, so it wins. PEFT's: adapter_model.safetensors + adapter_config.json (r,
lora_alpha, ...); its blocks and modules are read from the tensor names, which is what gets loaded.

This module imports neither MLX nor gradio: the page's process reads adapters with it (tests/test_adapter_reader.py).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LoraConfig, bound_problem

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MAX_HEADER = 100 * 2**20  # an adapter's safetensors header is a few KB; a larger claim is a broken file
BLOCK = re.compile(r"\.layers\.(\d+)\.")
# PEFT key -> (module path, A|B); files saved by PEFT drop the adapter name, some tools keep it (".default").
PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that does not fit; the message says exactly what does not match."""


@dataclass
class AdapterSettings:
    """What an adapter folder says about its adapter, whichever tool wrote it; the engine and the page both use it."""

    kind: str  # "ours", "mlx-lm" or "peft"
    folder: Path
    weights: Path  # the safetensors file
    rank: int
    alpha: float  # the update is scaled by alpha / rank (PEFT's rsLoRA alpha is converted to this meaning)
    dropout: float
    modules: list[str]  # in-block paths (self_attn.q_proj); [] = every linear module of a block (mlx-lm, no keys)
    layers: str  # LoraConfig.layers: "all", "last:N" or "0,2,5"
    base_model: str = ""  # "" when the folder does not name one
    num_blocks: int | None = None  # the base model's block count, where the folder records it (ours)
    step: int | None = None
    val_loss: float | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # adapter_config.json as written
    method: str = "lora"  # or dora (mlx-lm's fine_tune_type; PEFT's use_dora)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def lora_config(self, num_blocks: int | None = None) -> LoraConfig:
        """Our LoraConfig. Given the model's block count, last:N covering every block is "all", as mlx-lm's
        `model.layers[-N:]` reads it (our parse_layers refuses N past the model)."""
        layers = self.layers
        if num_blocks is not None and layers.startswith("last:") and int(layers[5:]) >= num_blocks:
            layers = "all"
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, modules=list(self.modules),
                          layers=layers, method=self.method)


def read_adapter(folder: str | Path) -> AdapterSettings:
    """The settings of the adapter in `folder` (ours, mlx-lm's or PEFT's), or AdapterError saying what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    if is_peft_folder(folder):
        return peft_settings(folder, read_peft_config(folder))
    return mlx_settings(folder, read_adapter_config(folder))


def adapter_folder(path: str | Path) -> Path:
    """An adapter folder, given as the folder or as the path of its weights file."""
    path = Path(path).expanduser()
    return path.parent if path.suffix == ".safetensors" else path


def is_peft_folder(folder: Path) -> bool:
    folder = Path(folder)
    has_weights = (folder / PEFT_WEIGHTS).is_file() or (folder / "adapter_model.bin").is_file()
    return has_weights and not (folder / ADAPTER_FILE).is_file()


def base_model_of(folder: Path) -> str | None:
    """The base model an adapter folder names (any kind), or None; never raises, for a default only."""
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
        ours = config.get("lora_app") or {}
        return ours.get("base_model") or config.get("model") or config.get("base_model_name_or_path") or None
    except (OSError, ValueError, AttributeError):
        return None


# ---- ours and mlx-lm's -------------------------------------------------------------------------------------

def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json of an mlx-lm-layout folder (ours or mlx_lm.lora's), checked for what we read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} (expected an mlx-lm adapter folder)")
    if not (folder / ADAPTER_FILE).is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_FILE}")
    config = read_json(folder / CONFIG_FILE)
    if config.get("fine_tune_type", "lora") not in ("lora", "dora", "full"):
        raise AdapterError(f"{folder / CONFIG_FILE}: fine_tune_type {config.get('fine_tune_type')!r} is not "
                           "supported (only lora, dora and full)")
    if not isinstance(config.get("lora_parameters"), dict) or "rank" not in config["lora_parameters"]:
        raise AdapterError(f"{folder / CONFIG_FILE}: lora_parameters with rank and scale missing")
    return config


def mlx_settings(folder: Path, config: dict[str, Any]) -> AdapterSettings:
    params, ours = config["lora_parameters"], config.get("lora_app") or {}
    if not isinstance(ours, dict):
        raise AdapterError(f"{folder / CONFIG_FILE}: lora_app must be an object (got {type(ours).__name__})")
    rank = checked_rank(params["rank"], folder)
    try:
        if ours:
            alpha, modules = float(ours["alpha"]), [str(m) for m in ours["modules"]]
            layers = ",".join(str(int(b)) for b in ours["blocks"])
        else:
            alpha = float(params["scale"]) * rank
            modules, layers = mlx_lm_targets(config)
        dropout = float(params.get("dropout", 0.0))
        num_blocks = int(ours["num_blocks"]) if "num_blocks" in ours else None
    except (KeyError, TypeError, ValueError) as e:  # a hand-edited config
        raise AdapterError(f"{folder / CONFIG_FILE}: scale, alpha, dropout, blocks and num_layers must be numbers "
                           f"({type(e).__name__}: {e})") from None
    return AdapterSettings(
        kind="ours" if ours else "mlx-lm", folder=folder, weights=folder / ADAPTER_FILE, rank=rank, alpha=alpha,
        dropout=dropout, modules=modules, layers=layers,
        base_model=str(ours.get("base_model") or config.get("model") or ""), num_blocks=num_blocks,
        step=config.get("step"), val_loss=config.get("val_loss"), config=config,
        method=str(config.get("fine_tune_type", "lora")))


def mlx_lm_targets(config: dict[str, Any]) -> tuple[list[str], str]:
    """(modules, layers) of an mlx_lm.lora config: in-block keys on the last num_layers blocks, or full module
    paths (model.layers.<b>.<module>), which name their blocks."""
    keys = [str(k) for k in config["lora_parameters"].get("keys") or []]
    full = [k for k in keys if k.startswith("model.layers.")]
    if full:
        blocks = sorted({int(k.split(".")[2]) for k in full})
        return sorted({k.split(".", 3)[3] for k in full}), ",".join(map(str, blocks))
    return keys, num_layers_spec(config.get("num_layers"))


def num_layers_spec(num_layers: Any) -> str:
    """mlx-lm's num_layers as a layers spec. mlx-lm adapts `model.layers[-max(num_layers, 0):]`
    (tuner/utils.py linear_to_lora_layers), so 0 and every negative number mean all blocks, not none."""
    if num_layers is None:  # mlx-lm always writes it; a hand-written config without it meant the whole model
        return "all"
    n = int(num_layers)
    return "all" if n <= 0 else f"last:{n}"


def checked_rank(value: Any, folder: Path) -> int:
    """The rank, bounded before it sizes any array (config.BOUNDS)."""
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise AdapterError(f"{folder / CONFIG_FILE}: the rank must be a number (got {value!r:.40})") from None
    problem = bound_problem("rank", rank)
    if problem:
        raise AdapterError(f"{folder / CONFIG_FILE}: {problem}")
    return rank


def read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


# ---- PEFT's ------------------------------------------------------------------------------------------------

def read_peft_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} (expected a PEFT adapter folder)")
    if not (folder / PEFT_WEIGHTS).is_file():
        raise AdapterError(f"{folder}: no {PEFT_WEIGHTS} (PEFT's pickled adapter_model.bin is not read; "
                           "save the adapter with safe_serialization=True)")
    config = read_json(path)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if unsupported:
        raise AdapterError(f"{path}: PEFT options not supported here: {', '.join(unsupported)}")
    return config


def peft_settings(folder: Path, config: dict[str, Any]) -> AdapterSettings:
    """Rank and alpha from the config, checked against the tensors; blocks and modules from the tensor names."""
    shapes = tensor_shapes(folder / PEFT_WEIGHTS)
    names = {name: mlx_name(name) for name, shape in shapes.items() if len(shape) == 2}
    bad = sorted(name for name in shapes if names.get(name) is None)
    if bad:
        raise AdapterError(f"{folder / PEFT_WEIGHTS}: tensors that are not LoRA A/B weights (e.g. embeddings, "
                           f"DoRA): {', '.join(bad[:5])}")
    rank = checked_rank(config.get("r", 8), folder)
    ranks = {shapes[name][0] for name, ours in names.items() if ours.endswith(".lora_a")}  # A is [r, in]
    if ranks != {rank}:
        raise AdapterError(f"{folder}: {CONFIG_FILE} says r={rank} but the tensors have rank "
                           f"{', '.join(map(str, sorted(ranks))) or 'none'}")
    # PEFT scales by lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA: the same scale as ours is alpha * sqrt(r)
    try:
        alpha = float(config.get("lora_alpha", 8)) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
        dropout = float(config.get("lora_dropout", 0.0))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{folder / CONFIG_FILE}: lora_alpha and lora_dropout must be numbers ({e})") from None
    paths = sorted({name.rpartition(".")[0] for name in names.values()})
    located = [(int(m.group(1)), p[m.end():]) for p in paths if (m := BLOCK.search(p))]
    if len(located) != len(paths):
        raise AdapterError(f"{folder}: LoRA on modules outside the model's blocks is not supported")
    return AdapterSettings(
        kind="peft", folder=folder, weights=folder / PEFT_WEIGHTS, rank=rank, alpha=alpha,
        dropout=dropout, modules=sorted({module for _, module in located}),
        layers=",".join(map(str, sorted({b for b, _ in located}))),
        base_model=str(config.get("base_model_name_or_path") or ""), config=config)


def mlx_name(peft_name: str) -> str | None:
    """mlx-lm's name for a PEFT LoRA tensor (`base_model.model.<path>.lora_A.weight` -> `<path>.lora_a`)."""
    m = PEFT_KEY.match(peft_name)
    return f"{m['path']}.lora_{m['ab'].lower()}" if m else None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without MLX; a file shorter than its header says is
    torn, and is refused here rather than half-loaded later."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER, size - 8):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        shapes, end = {}, 0
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(int(d) for d in info["shape"])
                end = max(end, int(info["data_offsets"][1]))
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, the header needs {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as e:
        raise AdapterError(f"{path}: cannot be read ({e})") from None
    return shapes
