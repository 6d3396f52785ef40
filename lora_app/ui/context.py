"""What every step needs to know about this app instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from .downloads import Downloads


@dataclass
class Context:
    runs_dir: Path
    models_dir: Path | None = None
    downloads: Downloads = field(default_factory=Downloads)


def warned(message: str) -> str:
    """Show `message` as a warning toast and return it, marked, for the step's message line."""
    gr.Warning(message)
    return "⚠️ " + message
