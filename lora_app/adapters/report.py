"""What `python -m lora_app export` prints: where the export is, each check's one-line result (the same lines
the page shows, from the folder's check.json; for an adapter written for Ollama instead of a GGUF, the first line
says so), the ollama command (after what to fill in first), LM Studio's folder. A check beyond its
tolerance prints a warning on stderr; the export stays (the user decides)."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

from .check import read_check, summary
from .export import export_adapter
from .lmstudio import copy_offered, copy_to_lmstudio, models_dir


def check_lines(folder: Path) -> list[str]:
    """One line per check in folder/check.json ("" when there is none)."""
    checks = read_check(folder) or {}
    results = [r for r in checks.values() if isinstance(r, dict)]
    # what was written, where it is not what was asked for (an adapter for Ollama instead of a GGUF), comes first
    lines = [summary(r) for r in sorted(results, key=lambda r: "written" not in r)]
    modelfile = checks.get("modelfile")
    if isinstance(modelfile, dict):
        first = f"first {modelfile['todo']}, then: " if modelfile.get("todo") else ""
        lines.append(f"Ollama: {first}{modelfile['ollama']}")
    return lines


def export_and_report(args: Namespace) -> int:
    out = export_adapter(Path(args.adapter), args.format, Path(args.out), args.model, args.dequantize, args.quantize,
                         args.ollama_base)
    print(f"wrote {out}")
    for line in check_lines(out):
        print(line)
    checks = read_check(out) or {}
    if not checks.get("ok", True):
        print(f"warning: {out}: a check after writing failed (see {out / 'check.json'})", file=sys.stderr)
    if args.format in ("mlx", "fused"):
        if copy_offered():
            if args.to_lmstudio:
                print(f"copied to LM Studio: {copy_to_lmstudio(out)}")
            else:
                print(f"LM Studio: add --to-lmstudio to copy it into {models_dir()} (or copy it there yourself)")
        else:
            print(f"LM Studio (macOS) finds MLX models in {models_dir()}/<publisher>/<model>/")
    return 0
