"""Export an adapter for other tools: Hugging Face PEFT (peft_format.py) or a fused model folder (fuse.py).

Exports never overwrite: they are written into a temporary folder next to the target and renamed onto it at
the end, so a crash leaves no half-written folder and an existing non-empty folder is refused.

GGUF: fuse with dequantize=True, then mlx-lm's GGUF writer, which only knows the families in GGUF_FAMILIES:
`mlx_lm.fuse --model BASE --adapter-path ADAPTER --save-path OUT --dequantize --export-gguf`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .fileio import fsync_dir

FORMATS = ("peft", "fused")
# The model_type values mlx_lm.fuse --export-gguf accepts (mlx_lm/fuse.py); its writer emits llama-layout
# GGUF and refuses quantized weights, hence --dequantize.
GGUF_FAMILIES = ("llama", "mistral", "mixtral")


class ExportError(ValueError):
    """An export that cannot be written; the message names the folder and what to do instead."""


def export_adapter(adapter_dir: Path, fmt: str, out: Path, model: str | None = None,
                   dequantize: bool = False) -> Path:
    """Write `adapter_dir` (ours, mlx-lm's, or PEFT for fused) to the new folder `out` as `fmt`; returns `out`."""
    if fmt == "peft":
        if dequantize:
            raise ExportError("--dequantize applies to --format fused only (a PEFT adapter has no base weights)")
        from .peft_format import export_peft

        return export_peft(Path(adapter_dir), Path(out), base_model=model)
    if fmt == "fused":
        from .fuse import fuse_adapter

        return fuse_adapter(Path(adapter_dir), Path(out), model=model, dequantize=dequantize)
    raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def base_model_of(adapter_dir: Path) -> str | None:
    """The base model an adapter folder names (ours, mlx-lm's or PEFT's config), or None."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ours = config.get("lora_app") or {}
    return ours.get("base_model") or config.get("model") or config.get("base_model_name_or_path") or None


def check_free(out: Path) -> None:
    """Refuse a target that holds anything: an export or a copy never overwrites a user's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out}: folder exists and is not empty; choose a new or empty folder "
                          "(nothing is ever overwritten)")


@contextlib.contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; it becomes `out` only if the block completes."""
    out = Path(out)
    check_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.writing-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is ordinary data
        try:
            os.replace(tmp, out)  # replaces only a missing or empty folder (POSIX), so never overwrites
        except OSError as e:
            raise ExportError(f"{out}: could not be written ({e.strerror}); was it filled meanwhile?") from None
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
