"""Default sample-probe prompts: the prompts of the first validation rows, as the user would type them; and the
Data step's preview report, which offers them (it lives here, above data.py, so data.py imports nothing back)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .config import DataConfig
from .data import (
    SAMPLE_ROWS,
    SAMPLE_TOKENS,
    choose_format,
    load_data,
    map_columns,
    objective_note,
    preview,
    prompt_completion,
    statistics,
)
from .data_sources import Source, read_source

MAX_PROBES = 5  # the trainer answers at most this many at each evaluation
TEXT_WORDS = 8  # a plain-text row has no prompt: its opening words stand in for one


def default_probe_prompts(cfg: DataConfig, n: int = 3, source: Source | None = None) -> list[str]:
    """Up to n prompts from the validation rows (train rows when there is no validation split), in file order."""
    source = source or read_source(cfg)
    fmt, _ = choose_format(cfg, source)
    rows = source.rows.get("valid") or source.rows.get("train") or []
    prompts: list[str] = []
    for row in rows:
        prompt = row_prompt(map_columns(row.data, cfg.columns), fmt) if isinstance(row.data, dict) else ""
        if prompt and prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) >= min(n, MAX_PROBES):
            break
    return prompts


def row_prompt(row: dict[str, Any], fmt: str) -> str:
    """The text a user would send to get this row's answer; '' when the row has none. One line: the probe
    box takes one prompt per line."""
    try:
        if fmt == "chat":
            users = [m.get("content") for m in row.get("messages") or [] if isinstance(m, dict)
                     and m.get("role") == "user"]
            text = users[-1] if users else ""
        elif fmt == "text":
            text = " ".join(str(row.get("text") or "").split()[:TEXT_WORDS])
        else:
            text = prompt_completion(row, fmt)[0]
    except (KeyError, TypeError):
        return ""
    return " ".join(text.split()) if isinstance(text, str) else ""


def preview_report(cfg: DataConfig, tokenizer: Any, max_seq_length: int, batch_size: int,
                   n_rows: int = 3, objective: str = "sft") -> dict[str, Any]:
    """What the Data step shows, as JSON: the first rows token by token, statistics over the first rows
    (SAMPLE_ROWS / SAMPLE_TOKENS), notes, and probe prompts from the first validation rows; preference pairs as the
    objective trains them (SFT: the chosen answers; DPO / ORPO: both). `python -m lora_app preview` runs it, so the
    page's process never holds a whole dataset."""
    source = read_source(cfg)
    rows = preview(cfg, tokenizer, n_rows, max_seq_length, source=source, objective=objective)
    loaded = load_data(cfg, tokenizer, batch_size=batch_size, source=source, sample=(SAMPLE_ROWS, SAMPLE_TOKENS))
    notes = loaded.notes + [note] if (note := objective_note(loaded.format, objective)) else loaded.notes
    return {"rows": [asdict(r) for r in rows], "statistics": statistics(loaded, max_seq_length, objective),
            "notes": notes, "prompts": default_probe_prompts(cfg, source=source)}
