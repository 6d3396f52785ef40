"""LoRA on chosen blocks × modules, with the seed's semantics, on top of mlx-lm's LoRALinear (lora_layer.py).

y = base(x) + (alpha / rank) · (x A) B with mlx-lm's storage: lora_a is [in, rank] (the seed's A transposed),
lora_b is [rank, out] and starts at zero, so step 0 reproduces the base model exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

from .config import MAX_LAYERS_CHARS, LoraConfig, short_repr, shown
from .models import blocks_of, linear_modules, linear_shape


class LoraError(ValueError):
    """Targets that do not fit the model; the message lists what the model has."""


@dataclass
class LoraTargets:
    blocks: list[int]  # sorted block indices
    modules: list[str]  # in-block paths, e.g. self_attn.q_proj

    def module_paths(self) -> list[str]:
        """Full module paths as they appear in adapter keys, sorted (deterministic)."""
        return sorted(f"model.layers.{b}.{m}" for b in self.blocks for m in self.modules)


def parse_layers(spec: str, num_blocks: int) -> list[int]:
    """'all' | 'last:N' | 'A-B' (inclusive) | '0,2,5' -> sorted block indices, checked against the model.

    Every number is checked before a list is built: the page calls this on each keystroke, and '0-20000000'
    would otherwise build twenty million indices in the UI process."""
    spec = str(spec).strip()
    if len(spec) > MAX_LAYERS_CHARS:
        raise LoraError(f"layers must be at most {MAX_LAYERS_CHARS} characters (got {len(spec)})")
    if spec == "all":
        return list(range(num_blocks))
    try:
        if spec.startswith("last:"):
            n = int(spec.split(":", 1)[1])
            if not 1 <= n <= num_blocks:
                raise LoraError(f"layers={spec}: the model has {num_blocks} blocks; choose last:1 to last:{num_blocks}")
            return list(range(num_blocks - n, num_blocks))
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-", 1))
            if lo > hi:
                raise LoraError(f"layers={spec}: the range is empty (start after end)")
            below, above = range(lo, min(hi + 1, 0)), range(max(lo, num_blocks), hi + 1)  # sizes, not lists
            check_blocks(spec, [below, above], num_blocks)
            return list(range(lo, hi + 1))
        blocks = sorted({int(x) for x in spec.split(",")})
    except LoraError:
        raise
    except ValueError:  # also int()'s refusal of more than 4300 digits
        raise LoraError(f"layers={short_repr(spec)}: expected all, last:N, A-B or a list like 0,2,5") from None
    check_blocks(spec, [[b for b in blocks if not 0 <= b < num_blocks]], num_blocks)
    return blocks


def check_blocks(spec: str, bad: list[Sequence[int]], num_blocks: int) -> None:
    """Refuse block numbers outside the model (`bad`: lists or ranges of them), naming the first few: a range
    like 0-20000000 is counted, never listed."""
    count = sum(len(b) for b in bad)
    if count:
        first = list(islice(chain.from_iterable(bad), 5))
        more = f" and {count - 5} more" if count > 5 else ""
        spec = spec if len(spec) <= 60 else short_repr(spec)
        raise LoraError(f"layers={spec}: block(s) [{', '.join(map(shown, first))}]{more} outside the model, "
                        f"which has blocks 0-{num_blocks - 1}")


def resolve_modules(names: list[str], available: list[str]) -> list[str]:
    """Match by the last name component ('q_proj' -> 'self_attn.q_proj') or by full in-block path."""
    chosen = []
    for name in names:
        hits = [a for a in available if a == name or a.rsplit(".", 1)[-1] == name]
        if not hits:
            short = sorted({a.rsplit(".", 1)[-1] for a in available})
            raise LoraError(f"module {name!r} not found in the model's blocks; it has: {', '.join(short)}")
        chosen += hits
    return sorted(set(chosen))


def resolve_targets(model: Any, cfg: LoraConfig) -> LoraTargets:
    blocks = blocks_of(model)
    available = list(linear_modules(blocks[0]))
    return LoraTargets(parse_layers(cfg.layers, len(blocks)), resolve_modules(cfg.modules, available))


def apply_lora(model: Any, cfg: LoraConfig, seed: int | None = None) -> LoraTargets:
    """Freeze the model and wrap the targets in LoRALinear (DoRALinear for method dora: also a magnitude `m` per
    output, starting at the base weight's row norms); only lora_a / lora_b (/ m) are trainable afterwards."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from .lora_layer import DoRALinear, LoRALinear

    targets = resolve_targets(model, cfg)
    if seed is not None:
        mx.random.seed(seed)
    model.freeze()
    if cfg.method == "full":
        unfreeze_targets(model, targets)
        return targets
    scale = cfg.alpha / cfg.rank
    blocks = blocks_of(model)
    for b in targets.blocks:
        existing = linear_modules(blocks[b])
        wrapped = []
        for name in targets.modules:
            out_features, in_features = linear_shape(existing[name])
            if cfg.method == "dora":
                layer = DoRALinear(in_features, out_features, r=cfg.rank, dropout=cfg.dropout, scale=scale)
                layer.set_linear(existing[name])  # m = the base rows' norms: step 0 is the base model
            else:
                layer = LoRALinear(in_features, out_features, r=cfg.rank, dropout=cfg.dropout, scale=scale)
                layer.linear = existing[name]
            # The seed's init: A ~ N(0, 1/sqrt(in)) (mlx-lm draws it uniform); B stays zero.
            layer.lora_a = mx.random.normal((in_features, cfg.rank)) * (1.0 / math.sqrt(in_features))
            wrapped.append((name, layer))
        blocks[b].update_modules(tree_unflatten(wrapped))
    mx.eval(model.trainable_parameters())
    return targets


def unfreeze_targets(model: Any, targets: LoraTargets) -> None:
    """Full fine-tuning: the chosen blocks' chosen modules train every weight (and bias); the rest stays frozen."""
    import mlx.nn as nn

    blocks = blocks_of(model)
    for b in targets.blocks:
        for name, module in linear_modules(blocks[b]).items():
            if name in targets.modules:
                if isinstance(module, nn.QuantizedLinear):
                    raise LoraError("method full trains the weights themselves, which a quantized model cannot: "
                                    "de-quantize the model (dequantize) or choose lora or dora")
                module.unfreeze()


def adapter_tensors(model: Any) -> dict[str, Any]:
    """The trainable LoRA tensors by full name, in sorted order."""
    from mlx.utils import tree_flatten

    return dict(sorted(tree_flatten(model.trainable_parameters())))


def trainable_parameter_count(model: Any) -> int:
    return sum(v.size for v in adapter_tensors(model).values())


def count_for(info_shapes: dict[str, list[int]], modules: list[str], num_blocks: int, rank: int,
              method: str = "lora") -> int:
    """Trainable parameters for a selection, computed from shapes alone (the UI's live estimate): LoRA's A and B;
    DoRA's also a magnitude per output; full fine-tuning every weight of the modules."""
    def per_module(shape: list[int]) -> int:
        if method == "full":
            return shape[0] * shape[1]
        return rank * (shape[0] + shape[1]) + (shape[0] if method == "dora" else 0)

    per_block = sum(per_module(shape) for name, shape in info_shapes.items() if name in modules)
    return per_block * num_blocks


def adapter_bytes(param_count: int, bytes_per_param: int = 4) -> int:
    """Size of adapters.safetensors (float32 tensors; the small header is ignored)."""
    return param_count * bytes_per_param
