"""Live numbers for the Adapter step: trainable parameters, share of the model, adapter size, memory."""

from __future__ import annotations

from ..config import bound_problem
from ..lora import LoraError, adapter_bytes, count_for, parse_layers
from ..memory import MEMORY_ADVICE, default_backend, estimate_training_memory, fitting_change
from . import engine


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def adapter_summary(info: dict, layers: str, modules: list[str], rank: int, batch_size: int = 4,
                    max_seq_length: int = 2048, grad_checkpoint: bool = False, longest_row: int | None = None,
                    method: str = "lora") -> str:
    """Markdown: trainable params (count, % of the model), adapter file size, training-memory estimate.
    `longest_row`: tokens in the data's longest row, from the Data step's preview (None before one); `method`:
    lora, dora (a magnitude per output as well) or full (every weight of the modules)."""
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
    n = count_for(info["module_shapes"], modules, len(blocks), int(rank), method or "lora")
    share = n / info["total_params"] if info.get("total_params") else 0
    text = (f"**Trainable parameters** {n:,} ({share:.3%} of {info['total_params']:,}) · "
            f"**adapter file** {human_bytes(adapter_bytes(n))} · {len(blocks)} block(s) × {len(modules)} module(s)")
    trained = info["num_blocks"] - min(blocks) if blocks else 0  # the gradient stops at the first adapted block
    memory = memory_text(info, n, batch_size, max_seq_length, grad_checkpoint, longest_row, modules, trained)
    return f"{text}\n\n{memory}" if memory else text


def memory_text(info: dict, trainable: int, batch_size: int, max_seq_length: int, grad_checkpoint: bool,
                longest_row: int | None = None, modules: list[str] | None = None,
                blocks_trained: int | None = None) -> str:
    """The training-memory estimate, 'about X (weights W, activations A)', for the Train step's batch size and the
    widest batch the data gives (its longest row, capped at max sequence length; before the Data step's preview,
    rows of max sequence length: an upper bound). Above the memory this machine can give training
    (engine.machine): the change that fits."""
    if not info.get("hidden_size"):
        return ""
    if not batch_size or batch_size < 1 or not max_seq_length or max_seq_length < 1:
        return "Training memory: set batch size and max sequence length (step 4) for an estimate."
    if problem := bound_problem("batch_size", batch_size) or bound_problem("max_seq_length", max_seq_length):
        return f"Training memory: ⚠️ {problem}"
    longest = int(longest_row) if isinstance(longest_row, (int, float)) and 0 < longest_row < 1e12 else None
    kw = {"longest_row": longest, "backend": default_backend(), "modules": modules, "blocks_trained": blocks_trained}
    est = estimate_training_memory(info, trainable, int(batch_size), int(max_seq_length), bool(grad_checkpoint), **kw)
    rows = (f"the data's longest row has {longest:,} tokens" if longest else
            "rows of the max sequence length: an upper bound until the Data step's preview finds the longest row")
    text = (f"**Training memory** about {human_bytes(est['total'])} (weights "
            f"{human_bytes(est['weights'] + est['lora_optimizer'])}, activations {human_bytes(est['activations'])})"
            f" at batch {int(batch_size)} × {est['width']:,} tokens ({rows})")
    available = engine.machine()[1]
    if available and est["total"] > available:
        change = fitting_change(info, trainable, int(batch_size), int(max_seq_length), bool(grad_checkpoint),
                                available, **kw)
        advice = (f"with {change.words} it would be about {human_bytes(change.estimate['total'])} (activations "
                  f"{human_bytes(change.estimate['activations'])})" if change else
                  f"none of the changes the app tries fits it. {MEMORY_ADVICE}")
        text = f"⚠️ {text}. That is more than the {human_bytes(available)} this machine can give training: {advice}"
    return text
