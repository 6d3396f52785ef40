"""Step 3, Data: the demo dataset, a folder with train/valid/test files, or one file that is split;
preview rows (trained tokens highlighted) and statistics, from `python -m lora_app preview` (lora_app.data with the
model's tokenizer) in a process of its own: the page's process never reads or tokenizes a whole dataset."""

from __future__ import annotations

import html
import math
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..config import BOUNDS, CHOICES, DEMO, ConfigError, short_repr
from . import form

# Tokens in the demo data's longest training row (the demo model's chat template; tests/test_memory.py checks it):
# the memory estimate's batch width for the default data before any preview.
DEMO_LONGEST_ROW = 62
MAX_SEQ_LENGTH = int(BOUNDS["max_seq_length"].high)  # the numbers that arrive from the page, bounded as in training
MAX_BATCH_SIZE = int(BOUNDS["batch_size"].high)


def preview_html(rows: list) -> str:
    parts = []
    for row in rows:
        if row.problem:
            parts.append(f'<div class="row-bad">{html.escape(row.where)}: {html.escape(row.problem)}</div>')
            continue
        tokens = "".join(f'<span class="{"tok-train" if trained else "tok-mask"}">{html.escape(text)}</span>'
                         for text, trained in row.segments)
        cut = f" · {row.cut} tokens cut" if row.cut else ""
        cut += f" · the last {row.hidden} kept tokens not shown" if row.hidden else ""
        parts.append(f'<div class="row"><div class="row-where">{html.escape(row.where)} · {row.tokens} tokens · '
                     f'{row.trained} trained{cut}</div><pre>{tokens}</pre></div>')
    legend = '<span class="tok-train">trained</span> <span class="tok-mask">context (not trained)</span>'
    return f'<div class="data-preview">{legend}{"".join(parts)}</div>'


def preview_data(model: str, data: str, data_format: str, valid_fraction: float, mask_prompt: bool,
                 skip_bad_rows: bool, max_seq_length: float, batch_size: float, probes: str,
                 objective: str = "sft") -> tuple:
    """Preview rows, statistics (over the first rows of a big dataset) and, when the Train step's sample-probe box
    is empty, prompts of the first validation rows for it; all from one `preview` subprocess. Preference pairs show
    as the Train step's objective trains them (sft: the chosen answers; dpo / orpo: chosen and rejected)."""
    return preview_with_longest(model, data, data_format, valid_fraction, mask_prompt, skip_bad_rows, max_seq_length,
                                batch_size, probes, objective)[:3]


def preview_with_longest(model: str, data: str, data_format: str, valid_fraction: float, mask_prompt: bool,
                         skip_bad_rows: bool, max_seq_length: float, batch_size: float, probes: str,
                         objective: str = "sft") -> tuple:
    """preview_data's outputs and the tokens of the longest training row (None when the preview failed): the
    Adapter step's memory estimate sizes the widest batch from it."""
    from ..data import PreviewRow, format_statistics
    from .engine import EngineError, preview

    if not (data or "").strip():
        gr.Warning("Data: empty; choose the demo data, a folder or a file.")
        return "", "⚠️ Data: empty.", gr.skip(), None
    try:
        report = preview((model or "demo").strip(), data.strip(), str(data_format),
                         page_number(valid_fraction, "valid_fraction", 0, 1), bool(mask_prompt), bool(skip_bad_rows),
                         page_int(max_seq_length, "max_seq_length", MAX_SEQ_LENGTH),
                         page_int(batch_size, "batch_size", MAX_BATCH_SIZE), page_choice(objective, "objective"))
    except (ConfigError, EngineError) as e:
        gr.Warning(f"Data {data}: {str(e).splitlines()[0]}")
        return "", "⚠️ " + html.escape(str(e)).replace("\n", "<br>"), gr.skip(), None
    rows = [PreviewRow(**row) for row in report["rows"]]
    notes = "\n".join(f"- {n}" for n in report["notes"] if n)
    prompts = gr.skip() if (probes or "").strip() else "\n".join(report["prompts"])
    stats = format_statistics(report["statistics"]) + ("\n\n" + notes if notes else "")
    return preview_html(rows), stats, prompts, int(report["statistics"].get("tokens_max") or 0) or None


def refresh_preview(shown: str, *args: Any) -> tuple:
    """preview_with_longest(*args) again when a preview is shown (the objective changed); else nothing changes."""
    return preview_with_longest(*args) if (shown or "").strip() else (gr.skip(),) * 4


def page_choice(value: Any, name: str) -> str:
    """One of config field `name`'s choices from the page, or ConfigError (it reaches a command line)."""
    if value not in CHOICES[name]:
        raise ConfigError(f"{name}: expected one of {', '.join(CHOICES[name])}, got {short_repr(value)}")
    return value


def page_number(value: Any, name: str, low: float, high: float) -> float:
    """A finite number in [low, high] from the page, or ConfigError (inf or nan must not reach int() or a loop)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ConfigError(f"{name} must be a number from {low:,} to {high:,} (got {value})")
    return number


def page_int(value: Any, name: str, high: int) -> int:
    """A whole number in [1, high] from the page, or ConfigError."""
    number = page_number(value, name, 1, high)
    if number != int(number):
        raise ConfigError(f"{name} must be a whole number (got {value})")
    return int(number)


def known_longest_row(data: str) -> int | None:
    """The longest row of data whose rows are known without reading them (the demo's), else None."""
    return DEMO_LONGEST_ROW if (data or "").strip() == DEMO else None


def pick_source(source: str, current: str) -> str:
    if source == "demo":
        return "demo"
    return "" if current == "demo" else current


def build() -> SimpleNamespace:
    gr.Markdown("Training data: the **demo** task (dates to ISO format, chat), a folder with "
                "`train.jsonl` / `valid.jsonl` / `test.jsonl`, or one file that is split into train and validation.")
    source = gr.Radio(["demo", "folder", "single file"], value="demo", label="Source")
    data = form.widget("data", info=None, elem_id="data-path")
    with gr.Row():
        data_format = form.widget("data_format")
        valid_fraction = form.slider("valid_fraction", 0.01)
        split_seed = form.widget("split_seed")
        mask_prompt = form.widget("mask_prompt", info=None)
        skip_bad_rows = form.widget("skip_bad_rows")
    preview = gr.Button("Preview and statistics", variant="primary")
    stats = gr.Markdown("", elem_id="data-stats")
    rows = gr.HTML("", elem_id="data-preview")
    # Tokens of the longest training row (the demo data's are known; other data's once previewed): the memory
    # estimate's batch width.
    longest = gr.State(known_longest_row(data.value))
    source.input(pick_source, [source, data], data, api_name="pick_data_source")
    gr.on([data.change, data_format.change], known_longest_row, data, longest, api_name="forget_longest_row",
          show_progress="hidden")
    return SimpleNamespace(source=source, data=data, data_format=data_format, valid_fraction=valid_fraction,
                           split_seed=split_seed, mask_prompt=mask_prompt, skip_bad_rows=skip_bad_rows,
                           preview=preview, stats=stats, rows=rows, longest=longest)
