"""Default sample-probe prompts: the prompts of the first validation rows, as the user would type them."""

from __future__ import annotations

from typing import Any

from .config import DataConfig
from .data import choose_format, map_columns, prompt_completion
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
