"""A model card (README.md) for the Hub, written from the run that trained the adapter: base model, data, settings,
final and best losses, the loss curve as a PNG, and how to load it with mlx-lm and PEFT.

The run is the adapter folder's parent when that holds config.json and events.jsonl (a run's adapters/ or best/);
an adapter from elsewhere gets a card from its adapter_config.json alone. The curve is drawn with Pillow (which
gradio installs), not matplotlib, which the app does not need.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import runs
from .reader import read_adapter

CURVE = "loss_curve.png"
SETTINGS = ("rank", "alpha", "dropout", "layers", "modules", "iters", "batch_size", "learning_rate", "lr_schedule",
            "warmup", "optimizer", "weight_decay", "max_seq_length", "mask_prompt", "seed")
SIZE, MARGIN = (720, 360), 48


def run_of(adapter_dir: Path) -> Path | None:
    parent = Path(adapter_dir).resolve().parent
    return parent if (parent / "config.json").is_file() and (parent / "events.jsonl").is_file() else None


def losses(run_dir: Path | None) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) losses by step from the run's events."""
    events = runs.read_events(run_dir) if run_dir else []
    train = [(e["step"], e["loss"]) for e in events if e["event"] == "train" and isinstance(e.get("loss"), float)]
    val = [(e["step"], e["val_loss"]) for e in events if e["event"] == "val" and isinstance(e.get("val_loss"), float)]
    return train, val


def draw_curve(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path) -> Path:
    """The losses against the step as a PNG: train in blue, validation in orange, axes with their ranges."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    points = train + val
    steps = [s for s, _ in points] or [0, 1]
    values = [v for _, v in points] or [0.0, 1.0]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(max(values), min(values) + 1e-6)
    w, h = SIZE[0] - 2 * MARGIN, SIZE[1] - 2 * MARGIN

    def xy(step: int, value: float) -> tuple[float, float]:
        return MARGIN + (step - x0) / (x1 - x0) * w, MARGIN + (y1 - value) / (y1 - y0) * h

    draw.rectangle([MARGIN, MARGIN, MARGIN + w, MARGIN + h], outline="#888888")
    for series, colour in ((train, "#1f77b4"), (val, "#ff7f0e")):
        if len(series) > 1:
            draw.line([xy(s, v) for s, v in series], fill=colour, width=2)
        for s, v in series if len(series) < 50 else []:
            x, y = xy(s, v)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    draw.text((MARGIN, 10), "loss by step: train (blue), validation (orange)", fill="black")
    draw.text((4, MARGIN - 6), f"{y1:.3g}", fill="black")
    draw.text((4, MARGIN + h - 6), f"{y0:.3g}", fill="black")
    draw.text((MARGIN, MARGIN + h + 8), str(x0), fill="black")
    draw.text((MARGIN + w - 30, MARGIN + h + 8), str(x1), fill="black")
    image.save(path, format="PNG")
    return path


def model_card(adapter_dir: Path, repo: str, fmt: str, curve: str | None) -> str:
    """README.md: YAML metadata the Hub reads, then the run in words and tables."""
    settings = read_adapter(adapter_dir)
    run_dir = run_of(adapter_dir)
    config = runs.read_config(run_dir) if run_dir else {}
    train, val = losses(run_dir)
    base = config.get("model") or settings.base_model or "unknown"
    meta = {"library_name": "peft" if fmt == "peft" else "mlx", "base_model": base if "/" in base and not
            Path(base).exists() else None, "tags": ["lora", "mlx", "lora-studio"], "pipeline_tag": "text-generation"}
    header = "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in meta.items() if v is not None) + "---\n"
    rows = [("base model", f"`{base}`"), ("data", f"`{config.get('data', '?')}`" if config else "?"),
            ("rank / alpha (scale)", f"{settings.rank} / {settings.alpha:g} ({settings.scale:g})"),
            ("blocks", settings.layers), ("modules", ", ".join(settings.modules) or "every linear module")]
    rows += [(k.replace("_", " "), f"`{json.dumps(config[k])}`") for k in SETTINGS[5:] if k in config]
    if train:
        rows.append(("final train loss", f"{train[-1][1]:.4f} (step {train[-1][0]})"))
    if val:
        step, best = min(val, key=lambda p: p[1])
        rows += [("final validation loss", f"{val[-1][1]:.4f} (step {val[-1][0]})"),
                 ("best validation loss", f"{best:.4f} (step {step})")]
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    image = f"\n![Loss curve]({curve})\n" if curve else ""
    return (f"{header}\n# {repo.split('/')[-1]}\n\nA LoRA {'fused into' if fmt == 'fused' else 'adapter for'} "
            f"`{base}`, trained with LoRA Studio (MLX).\n\n{table}{image}\n{usage(repo, base, fmt)}")


def usage(repo: str, base: str, fmt: str) -> str:
    if fmt == "fused":
        return ("## Use it\n\n```bash\npip install mlx-lm\n"
                f"mlx_lm.generate --model {repo} --prompt \"Hello\"\n```\n")
    mlx = ("## Use it with mlx-lm\n\n```bash\npip install mlx-lm huggingface_hub\n"
           f"hf download {repo} --local-dir adapter\nmlx_lm.generate --model {base} --adapter-path adapter "
           "--prompt \"Hello\"\n```\n")
    where = repo if fmt == "peft" else "peft-adapter"
    peft = ("## Use it with PEFT\n\n"
            + ("" if fmt == "peft" else "This is mlx-lm's layout; PEFT reads the export of it: `python -m lora_app "
               "export --adapter adapter --format peft --out peft-adapter` (or push with `--format peft`).\n\n")
            + "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base}\"), \"{where}\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{base}\")\n```\n")
    return peft if fmt == "peft" else mlx + "\n" + peft


def write_card(folder: Path, adapter_dir: Path, repo: str, fmt: str) -> list[str]:
    """README.md (and the curve's PNG when the run has losses) into `folder`; returns the files written."""
    train, val = losses(run_of(adapter_dir))
    written = []
    if train or val:
        draw_curve(train, val, Path(folder) / CURVE)
        written.append(CURVE)
    (Path(folder) / "README.md").write_text(model_card(adapter_dir, repo, fmt, CURVE if written else None))
    return ["README.md", *written]
