"""A memory estimate for a training run, and what the machine can give, so a run that cannot fit is warned about.

The activation model is the per-block count of Korthikanti et al. ("Reducing Activation Recomputation in Large
Transformer Models"): a block keeps about s·b·h·(34 + 5·a·s/h) bytes of 16-bit activations for the backward
pass. With gradient checkpointing only each block's input is kept, and one block at a time is recomputed.
Imports neither gradio nor (at module level) mlx, so the UI can show the estimate before loading a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .head_loss import CHUNK_BYTES

GB = 1e9
HEAD_DIM = 64  # when the head count is unknown, assume the common head size
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MEMORY_ADVICE = "Try a smaller batch size, a shorter max sequence length, or gradient checkpointing."


def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _get(info: Any, name: str, default: Any = 0) -> Any:
    """A field of a ModelInfo, of its to_dict(), or of any object with the same names."""
    value = info.get(name, default) if isinstance(info, dict) else getattr(info, name, default)
    return default if value is None else value


def dtype_bytes_of(info: Any) -> int:
    return DTYPE_BYTES.get(str(_get(info, "dtype", "")).replace("mlx.core.", ""), 2)


def weight_bytes(info: Any, dtype_bytes: int) -> int:
    """The frozen base: packed bits plus a scale and a bias per group when quantized."""
    params = int(_get(info, "total_params"))
    quant = _get(info, "quantization", None)
    if quant:
        bits, group = int(quant.get("bits", 4)), int(quant.get("group_size", 64))
        return int(params * bits / 8 + params / group * 2 * dtype_bytes)
    return params * dtype_bytes


def block_activation_bytes(hidden: int, heads: int, batch: int, seq: int, dtype_bytes: int) -> int:
    """Activations one block keeps for the backward pass (the paper's count, scaled from 16-bit)."""
    return int(seq * batch * hidden * (34 + 5 * heads * seq / hidden) * dtype_bytes / 2)


def estimate_training_memory(info: Any, trainable_params: int, batch_size: int, max_seq_length: int,
                             grad_checkpoint: bool = False, dtype_bytes: int | None = None) -> dict[str, int]:
    """Bytes a run needs: frozen weights, LoRA weights + gradients + Adam moments (float32), activations
    with and without gradient checkpointing (including one chunk of the loss's logits), and the total."""
    dtype_bytes = dtype_bytes or dtype_bytes_of(info)
    hidden, blocks = int(_get(info, "hidden_size")), int(_get(info, "num_blocks"))
    heads = int(_get(info, "num_heads")) or max(1, hidden // HEAD_DIM)
    tokens = batch_size * max_seq_length
    # The loss goes through the LM head in chunks (head_loss.py): the logits and their gradient for one chunk at a
    # time, plus the [tokens, hidden] gradient it keeps for the backward pass.
    logits = 2 * min(tokens * int(_get(info, "vocab_size")) * dtype_bytes, CHUNK_BYTES) + tokens * hidden * dtype_bytes
    per_block = block_activation_bytes(hidden, heads, batch_size, max_seq_length, dtype_bytes)
    full = blocks * per_block + logits
    checkpointed = blocks * tokens * hidden * dtype_bytes + per_block + logits
    result = {
        "weights": weight_bytes(info, dtype_bytes),
        "lora_optimizer": 4 * 4 * int(trainable_params),  # weights, gradients, Adam m and v
        "activations_full": full,
        "activations_checkpointed": checkpointed,
        "activations": checkpointed if grad_checkpoint else full,
    }
    result["total"] = result["weights"] + result["lora_optimizer"] + result["activations"]
    return result


def available_memory() -> tuple[int, str]:
    """(bytes, where the number comes from): the GPU's recommended working set where MLX reports one,
    else the memory the system has available now, else its physical memory."""
    try:
        import mlx.core as mx

        device = mx.device_info() if hasattr(mx, "device_info") else {}
    except Exception:  # noqa: BLE001 - an MLX build without device info
        device = {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if device.get(key):
            return int(device[key]), f"mx.device_info()['{key}']"
    meminfo = meminfo_available()
    if meminfo:
        return meminfo, "/proc/meminfo MemAvailable"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system memory (os.sysconf)"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_warning(estimate: dict[str, int], available: int, source: str = "", limit: int = 0) -> str | None:
    """A plain warning when the estimate exceeds what the machine (or the memory limit) gives, else None."""
    budget, where = available, source or "available memory"
    if limit and (not budget or limit < budget):
        budget, where = limit, "the memory limit (memory_limit_gb)"
    if not budget or estimate["total"] <= budget:
        return None
    parts = (f"weights {human(estimate['weights'])}, LoRA + optimizer {human(estimate['lora_optimizer'])}, "
             f"activations {human(estimate['activations'])}")
    advice = MEMORY_ADVICE
    if estimate["activations"] > estimate["activations_checkpointed"]:
        saved = estimate["total"] - estimate["activations"] + estimate["activations_checkpointed"]
        advice += f" With gradient checkpointing it would need about {human(saved)}."
    return (f"this run may need about {human(estimate['total'])} ({parts}), more than the "
            f"{human(budget)} from {where}. {advice}")


def check_model(model: Any, trainable_params: int, batch_size: int, max_seq_length: int,
                grad_checkpoint: bool, limit: int = 0) -> tuple[str, str | None, dict[str, int]]:
    """For the trainer: (an info line, a warning or None, the estimate) for a loaded model."""
    from .models import inspect_model

    info = inspect_model(model)
    args = getattr(model, "args", None)
    info_dict = {**info.to_dict(), "num_heads": int(getattr(args, "num_attention_heads", 0) or 0)}
    estimate = estimate_training_memory(info_dict, trainable_params, batch_size, max_seq_length, grad_checkpoint)
    available, source = available_memory()
    line = f"memory estimate: about {human(estimate['total'])}; {human(available)} available ({source})"
    return line, memory_warning(estimate, available, source, limit), estimate
