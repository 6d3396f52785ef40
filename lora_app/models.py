"""Resolve and load a model (local folder, downloaded Hugging Face repo id, or the demo), and describe it for the UI."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import DEMO


class ModelError(ValueError):
    """A model that cannot be used; the message says which file and what is wrong."""


@dataclass
class ModelInfo:
    path: str
    architecture: str
    num_blocks: int
    linear_modules: list[str]  # in-block paths, e.g. self_attn.q_proj
    total_params: int
    hidden_size: int = 0
    vocab_size: int = 0
    dtype: str = ""
    quantization: dict | None = None  # {"bits": 4, "group_size": 32} when the base is quantized
    module_shapes: dict[str, list[int]] = field(default_factory=dict)  # in-block path -> [out, in]

    def to_dict(self) -> dict:
        return asdict(self)


def is_hub_id(model: str) -> bool:
    """"org/name" that is not a folder here: a Hugging Face repo id."""
    return (model != DEMO and model.count("/") == 1 and not model.startswith((".", "/", "~"))
            and not Path(model).expanduser().exists())


def resolve_model(model: str) -> str:
    """Map 'demo' to the cached demo folder; check a local folder; a hub repo id to its downloaded snapshot in the
    Hugging Face cache. Never downloads: a repo not in the cache is a ModelError that says how to get it."""
    if model == DEMO:
        from .demo import demo_model_dir

        return str(demo_model_dir())
    if is_hub_id(model):
        from .hub import cached_model

        snapshot = cached_model(model)
        if snapshot is None:
            raise ModelError(f"{model} is not downloaded yet: download it in the Model step or run "
                             f"`python -m lora_app download {model}`")
        check_model_folder(snapshot)
        return str(snapshot)
    path = Path(model).expanduser()
    check_model_folder(path)
    return str(path.resolve())


def check_model_folder(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelError(f"model path is not a folder: {path}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path}: no config.json (expected a Hugging Face / MLX model folder)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{config}: not valid JSON ({e})") from None
    if not list(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no *.safetensors weight files")


def default_dequantize() -> bool:
    """Quantized matmuls are slow on the CPU backend; GPUs keep the 4-bit base (QLoRA)."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def load_model(model: str, dequantize: bool | None = None, lazy: bool = False) -> tuple[Any, Any]:
    """Load (model, tokenizer) through mlx_lm.load; errors become ModelError with the path in the message."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    path = resolve_model(model)
    try:
        mlx_model, tokenizer = load(path, lazy=lazy)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt weights, unknown architecture, missing tokenizer, no network
        raise ModelError(f"could not load model {model!r}: {type(e).__name__}: {e}") from None
    if dequantize is None:
        dequantize = default_dequantize()
    if dequantize and quantization_of(mlx_model):
        dequantize_model(mlx_model)
        if mx.default_device() == mx.cpu:  # float32 takes the fast BLAS path on CPU
            mlx_model.apply(lambda w: w.astype(mx.float32) if mx.issubdtype(w.dtype, mx.floating) else w)
    mlx_model.freeze()
    nn.Module.eval(mlx_model)
    return mlx_model, tokenizer


def quantization_of(model: Any) -> dict | None:
    import mlx.nn as nn

    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"bits": m.bits, "group_size": m.group_size}
    return None


def blocks_of(model: Any) -> list[Any]:
    return list(model.layers)


def linear_modules(block: Any) -> dict[str, Any]:
    """Every linear module inside one block, by in-block path (self_attn.q_proj, mlp.down_proj, ...)."""
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear

    found = {}
    for name, m in block.named_modules():
        if isinstance(m, LoRALinear):
            found[name] = m.linear
        elif isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not name.endswith(".linear"):
            found[name] = m
    return dict(sorted(found.items()))


def linear_shape(m: Any) -> list[int]:
    """[out_features, in_features], also for quantized layers whose packed weight hides in_features."""
    out, packed_in = m.weight.shape
    bits = getattr(m, "bits", None)
    return [out, packed_in * 32 // bits if bits else packed_in]


def inspect_model(model: Any, path: str = "") -> ModelInfo:
    """What the UI shows before training: architecture, blocks, linear modules, parameters, quantization."""
    from mlx_lm.utils import get_total_parameters

    blocks = blocks_of(model)
    modules = linear_modules(blocks[0]) if blocks else {}
    args = getattr(model, "args", None)
    weight = next(iter(modules.values())).weight if modules else None
    quant = quantization_of(model)
    dtype = str(getattr(next(iter(modules.values())), "scales", weight).dtype) if weight is not None else ""
    return ModelInfo(
        path=path,
        architecture=getattr(args, "model_type", type(model).__module__.rsplit(".", 1)[-1]),
        num_blocks=len(blocks),
        linear_modules=list(modules),
        total_params=int(get_total_parameters(model)),
        hidden_size=int(getattr(args, "hidden_size", 0) or 0),
        vocab_size=int(getattr(args, "vocab_size", 0) or 0),
        dtype=dtype.replace("mlx.core.", ""),
        quantization=quant,
        module_shapes={name: linear_shape(m) for name, m in modules.items()},
    )


def inspect_path(model: str) -> ModelInfo:
    """inspect_model on a model that is loaded lazily: weights are not read."""
    path = resolve_model(model)
    mlx_model, _ = load_model(path, dequantize=False, lazy=True)
    return inspect_model(mlx_model, path)
