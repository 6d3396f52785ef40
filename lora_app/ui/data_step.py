"""Step 3, Data: the demo dataset, a folder with train/valid/test files, or one file that is split;
preview rows (trained tokens highlighted) and statistics, through lora_app.data with the model's tokenizer."""

from __future__ import annotations

import html
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..config import ConfigError, DataConfig

FORMATS = ["auto", "text", "completions", "chat", "instruction"]


@lru_cache(maxsize=4)
def tokenizer_for(model: str) -> Any:
    """The model's tokenizer (transformers only; no MLX in the UI process)."""
    from transformers import AutoTokenizer

    from ..models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def preview_html(rows: list) -> str:
    parts = []
    for row in rows:
        if row.problem:
            parts.append(f'<div class="row-bad">{html.escape(row.where)}: {html.escape(row.problem)}</div>')
            continue
        tokens = "".join(f'<span class="{"tok-train" if trained else "tok-mask"}">{html.escape(text)}</span>'
                         for text, trained in row.segments)
        cut = f" · {row.cut} tokens cut" if row.cut else ""
        parts.append(f'<div class="row"><div class="row-where">{html.escape(row.where)} · {row.tokens} tokens · '
                     f'{row.trained} trained{cut}</div><pre>{tokens}</pre></div>')
    legend = '<span class="tok-train">trained</span> <span class="tok-mask">context (not trained)</span>'
    return f'<div class="data-preview">{legend}{"".join(parts)}</div>'


def preview_data(model: str, data: str, data_format: str, valid_fraction: float, mask_prompt: bool,
                 skip_bad_rows: bool, max_seq_length: float, batch_size: float, probes: str) -> tuple:
    """Preview rows, statistics and, when the Train step's sample-probe box is empty, prompts of the first
    validation rows for it; the source is read once for all three."""
    from .. import data as data_mod
    from ..data_sources import read_source
    from ..probes import default_probe_prompts
    from ..user_errors import USER_ERRORS

    if not (data or "").strip():
        gr.Warning("Data: empty; choose the demo data, a folder or a file.")
        return "", "⚠️ Data: empty.", gr.skip()
    try:
        cfg = DataConfig(data=data.strip(), data_format=data_format, valid_fraction=float(valid_fraction),
                         mask_prompt=bool(mask_prompt), skip_bad_rows=bool(skip_bad_rows))
        tokenizer = tokenizer_for((model or "demo").strip())
        source = read_source(cfg)
        rows = data_mod.preview(cfg, tokenizer, n_rows=3, max_seq_length=int(max_seq_length), source=source)
        loaded = data_mod.load_data(cfg, tokenizer, batch_size=int(batch_size), source=source)
        stats = data_mod.format_statistics(data_mod.statistics(loaded, int(max_seq_length)))
        prompts = gr.skip() if (probes or "").strip() else "\n".join(default_probe_prompts(cfg, source=source))
    except (ConfigError, *USER_ERRORS, OSError) as e:
        gr.Warning(f"Data {data}: {str(e).splitlines()[0]}")
        return "", "⚠️ " + html.escape(str(e)).replace("\n", "<br>"), gr.skip()
    notes = "\n".join(f"- {n}" for n in loaded.notes if n)
    return preview_html(rows), stats + ("\n\n" + notes if notes else ""), prompts


def pick_source(source: str, current: str) -> str:
    if source == "demo":
        return "demo"
    return "" if current == "demo" else current


def build() -> SimpleNamespace:
    gr.Markdown("Training data: the **demo** task (dates to ISO format, chat), a folder with "
                "`train.jsonl` / `valid.jsonl` / `test.jsonl`, or one file that is split into train and validation.")
    source = gr.Radio(["demo", "folder", "single file"], value="demo", label="Source")
    data = gr.Textbox("demo", label="Data: 'demo', a folder or a file (.jsonl/.json/.csv/.parquet)",
                      elem_id="data-path")
    with gr.Row():
        data_format = gr.Dropdown(FORMATS, value="auto", label="Format")
        valid_fraction = gr.Slider(0.01, 0.5, value=0.1, step=0.01, label="Validation share (single file)")
        mask_prompt = gr.Checkbox(False, label="Train on completions / assistant turns only")
        skip_bad_rows = gr.Checkbox(False, label="Skip bad rows")
    preview = gr.Button("Preview and statistics", variant="primary")
    stats = gr.Markdown("", elem_id="data-stats")
    rows = gr.HTML("", elem_id="data-preview")
    source.input(pick_source, [source, data], data, api_name="pick_data_source")
    return SimpleNamespace(source=source, data=data, data_format=data_format, valid_fraction=valid_fraction,
                           mask_prompt=mask_prompt, skip_bad_rows=skip_bad_rows, preview=preview, stats=stats,
                           rows=rows)
