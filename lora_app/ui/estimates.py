"""Live numbers for the Adapter step: trainable parameters, share of the model, adapter size, memory."""

from __future__ import annotations

from ..config import bound_problem
from ..lora import LoraError, adapter_bytes, count_for, parse_layers
from ..memory import MEMORY_ADVICE, estimate_training_memory
from . import engine


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def adapter_summary(info: dict, layers: str, modules: list[str], rank: int, batch_size: int = 4,
                    max_seq_length: int = 2048, grad_checkpoint: bool = False) -> str:
    """Markdown: trainable params (count, % of the model), adapter file size, training-memory estimate."""
    if not info:
        return "Inspect the model (step 1) to see trainable parameters and sizes."
    try:
        blocks = parse_layers(layers, info["num_blocks"])  # refuses a huge range before building it
    except LoraError as e:
        return f"⚠️ {e}"
    if problem := bound_problem("rank", rank):  # the form can send anything: 1e30, inf
        return f"⚠️ {problem}"
    unknown = [m for m in modules if m not in info["module_shapes"]]
    if unknown:
        return f"⚠️ module(s) {', '.join(unknown)} not in this model; it has {', '.join(info['linear_modules'])}"
    n = count_for(info["module_shapes"], modules, len(blocks), int(rank))
    share = n / info["total_params"] if info.get("total_params") else 0
    text = (f"**Trainable parameters** {n:,} ({share:.3%} of {info['total_params']:,}) · "
            f"**adapter file** {human_bytes(adapter_bytes(n))} · {len(blocks)} block(s) × {len(modules)} module(s)")
    memory = memory_text(info, n, batch_size, max_seq_length, grad_checkpoint)
    return f"{text}\n\n{memory}" if memory else text


def memory_text(info: dict, trainable: int, batch_size: int, max_seq_length: int, grad_checkpoint: bool) -> str:
    """The training-memory estimate for the Train step's batch size and max sequence length (rows are packed up
    to that length, so it is an upper bound for shorter data)."""
    if not info.get("hidden_size"):
        return ""
    if not batch_size or batch_size < 1 or not max_seq_length or max_seq_length < 1:
        return "Training memory: set batch size and max sequence length (step 4) for an estimate."
    if problem := bound_problem("batch_size", batch_size) or bound_problem("max_seq_length", max_seq_length):
        return f"Training memory: ⚠️ {problem}"
    est = estimate_training_memory(info, trainable, int(batch_size), int(max_seq_length), bool(grad_checkpoint))
    text = (f"**Training memory** up to about {human_bytes(est['total'])} at batch {int(batch_size)} × "
            f"{int(max_seq_length)} tokens (weights {human_bytes(est['weights'])}, activations "
            f"{human_bytes(est['activations'])})")
    if not grad_checkpoint and est["activations_checkpointed"] < est["activations"]:
        saved = est["total"] - est["activations"] + est["activations_checkpointed"]
        text += f"; with gradient checkpointing about {human_bytes(saved)}"
    free_gb = engine.memory_available_gb()
    available = free_gb * 1e9 if free_gb else 0
    if available and est["total"] > available:
        text = f"⚠️ {text}. That is more than the {human_bytes(available)} of memory available now: {MEMORY_ADVICE}"
    return text

