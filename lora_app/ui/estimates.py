"""Live numbers for the Adapter step: trainable parameters, share of the model, adapter size, memory."""

from __future__ import annotations

from typing import Any

from ..lora import LoraError, adapter_bytes, count_for, parse_layers


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def adapter_summary(info: dict, layers: str, modules: list[str], rank: int) -> str:
    """Markdown: trainable params (count, % of the model), adapter file size, training-memory estimate."""
    if not info:
        return "Inspect the model (step 1) to see trainable parameters and sizes."
    try:
        blocks = parse_layers(layers, info["num_blocks"])
    except LoraError as e:
        return f"⚠️ {e}"
    unknown = [m for m in modules if m not in info["module_shapes"]]
    if unknown:
        return f"⚠️ module(s) {', '.join(unknown)} not in this model; it has {', '.join(info['linear_modules'])}"
    n = count_for(info["module_shapes"], modules, len(blocks), int(rank))
    share = n / info["total_params"] if info.get("total_params") else 0
    text = (f"**Trainable parameters** {n:,} ({share:.3%} of {info['total_params']:,}) · "
            f"**adapter file** {human_bytes(adapter_bytes(n))} · {len(blocks)} block(s) × {len(modules)} module(s)")
    memory = training_memory_estimate(info, n)
    return text + (f" · **training memory** about {memory}" if memory else "")


def training_memory_estimate(info: dict, trainable: int, **settings: Any) -> str | None:
    """Hook for lora_app.memory (issue 6): None until that module provides an estimate."""
    try:
        from .. import memory
    except ImportError:
        return None
    estimate = getattr(memory, "estimate", None) or getattr(memory, "estimate_training_memory", None)
    if estimate is None:
        return None
    try:
        result = estimate(info=info, trainable_params=trainable, **settings)
    except Exception:  # noqa: BLE001 - an estimate must never break the page
        return None
    return human_bytes(result) if isinstance(result, (int, float)) else str(result)
