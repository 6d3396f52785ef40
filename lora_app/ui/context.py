"""What every step needs to know about this app instance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Context:
    runs_dir: Path
    models_dir: Path | None = None
