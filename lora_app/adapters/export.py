"""Export an adapter for other tools: Hugging Face PEFT (peft.py's mapping) or a fused model folder (fuse.py).

Exports never overwrite: they are written into a temporary folder next to the target and renamed onto it at
the end, so a crash leaves no half-written folder and an existing non-empty folder is refused.

GGUF: fuse with dequantize=True, then mlx-lm's GGUF writer, which only knows the families in GGUF_FAMILIES:
`mlx_lm.fuse --model BASE --adapter-path ADAPTER --save-path OUT --dequantize --export-gguf`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..fileio import atomic_write, atomic_write_json, fsync_dir
from .fuse import fused_model
from .loader import read_tensors
from .peft import peft_config_for, to_peft_tensors
from .reader import CONFIG_FILE, PEFT_WEIGHTS, base_model_of, is_peft_folder, read_adapter

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
        return export_peft(Path(adapter_dir), Path(out), base_model=model)
    if fmt == "fused":
        return fuse_adapter(Path(adapter_dir), Path(out), model=model, dequantize=dequantize)
    raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def export_peft(adapter_dir: Path, out: Path, base_model: str | None = None) -> Path:
    """Write `out`/adapter_model.safetensors + adapter_config.json from our (or mlx-lm's) adapter folder."""
    import mlx.core as mx

    if is_peft_folder(adapter_dir):
        raise ExportError(f"{adapter_dir}: already a PEFT adapter; copy the folder instead")
    settings = read_adapter(adapter_dir)
    weights = read_tensors(settings.weights)  # a torn file: one line, and nothing is written
    tensors = to_peft_tensors(weights, adapter_dir)
    peft_config = peft_config_for(settings, weights, base_model or settings.base_model or None)
    with new_folder(out) as tmp:
        atomic_write(tmp / PEFT_WEIGHTS, lambda p: mx.save_safetensors(str(p), tensors, metadata={"format": "pt"}))
        atomic_write_json(tmp / CONFIG_FILE, peft_config)
    return Path(out)


def fuse_adapter(adapter_dir: Path, out: Path, model: str | None = None, dequantize: bool = False) -> Path:
    """Merge the adapter into the base weights and write the model folder `out` (config, tokenizer, weights)."""
    from mlx_lm.utils import save

    base = model or base_model_of(adapter_dir)
    if not base:
        raise ExportError(f"{adapter_dir}: the adapter config does not name its base model; pass --model BASE")
    mlx_model, tokenizer, path, config = fused_model(Path(adapter_dir), base, dequantize)
    with new_folder(out) as tmp:
        save(tmp, path, mlx_model, tokenizer, config, donate_model=False)
    return Path(out)


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
