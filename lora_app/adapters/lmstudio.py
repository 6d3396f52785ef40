"""LM Studio's models folder, and a copy of an MLX export into it.

LM Studio documents `~/.lmstudio/models/<publisher>/<model>/` as where it finds models (its "Import Models"
page); it runs MLX models on Apple Silicon only, so the copy is offered on macOS, and only when that folder exists
(LM Studio has run at least once). Elsewhere the export says where the folder would be.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

PUBLISHER = "lora-studio"


def models_dir(home: Path | None = None) -> Path:
    return (home or Path.home()) / ".lmstudio" / "models"


def copy_offered(home: Path | None = None, system: str | None = None) -> bool:
    return (system or platform.system()) == "Darwin" and models_dir(home).is_dir()


def copy_to_lmstudio(folder: Path, home: Path | None = None) -> Path:
    """Copy the export folder to <models>/lora-studio/<folder name>; never over an existing model."""
    from .export import check_free

    target = models_dir(home) / PUBLISHER / Path(folder).name
    check_free(target)
    shutil.copytree(folder, target, dirs_exist_ok=True)
    return target
