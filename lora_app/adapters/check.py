"""Checked after writing: a fused model's logits against base + adapter, and the check.json every export carries.

Users of mlx-lm report fused models that answer differently from base + adapter; so after every fuse the folder
as written is loaded the way other tools load it (`mlx_lm.load`) and its logits on a few prompts are compared with
the base model carrying the adapter, as it was trained. The largest difference, relative to the largest logit, is
held against a tolerance for the folder's weights (float32, float16, bfloat16, 8-bit, 4-bit) that
bench/export_tolerance.py measured (bench/README.md); beyond it the result says so. The adapter's own effect (base
with and without it) is reported beside it, so a reader sees that the check could fail; quantized weights must
also keep the difference well under that effect, or the export has lost the adapter.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json

CHECK_FILE = "check.json"
PROMPTS = ("The capital of France is", "Write 17 March 2023 as YYYY-MM-DD.", "def add(a, b):\n    return")
# Largest |fused - (base + adapter)| / largest |base + adapter| logit accepted, from bench/export_tolerance.py
# (bench/README.md): float weights, a few times the rounding a correct fuse showed (more means a broken fuse);
# quantized, where greedy tokens still agreed >= 94%. Re-quantizing can also move the logits further than the
# adapter itself does (a small adapter on a 4-bit base), which loses the adapter, or flip the greedy token where
# it was a near tie: quantized weights must also stay within EFFECT_SHARE of the adapter's own effect and keep
# MIN_AGREEMENT of the greedy tokens.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2, "8-bit": 0.2, "4-bit": 0.2}
EFFECT_SHARE = 0.5
MIN_AGREEMENT = 0.95  # quantized: the share of positions whose greedy token stays the adapter's
ADVICE = {"4-bit": "export 8-bit (--quantize 8) or float (--dequantize) instead",
          "8-bit": "export float weights (--dequantize) instead"}
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def weight_kind(folder: Path) -> str:
    """"4-bit" / "8-bit" for a quantized model folder, else the dtype holding most of its weights."""
    config = json.loads((Path(folder) / "config.json").read_text())
    quant = config.get("quantization") or {}
    if quant.get("bits"):
        return f"{quant['bits']}-bit"
    counts: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for entry in safetensors_header(path).values():
            if isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES:
                kind = SAFETENSORS_DTYPES[entry["dtype"]]
                counts[kind] = counts.get(kind, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return max(counts, key=counts.get) if counts else "float32"


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(size))


def compare_logits(fused_dir: Path, adapter_dir: Path, base: str, prompts: tuple[str, ...] = PROMPTS,
                   tolerance: float | None = None) -> dict[str, Any]:
    """The fused folder (loaded by mlx_lm.load) against `base` + the adapter on `prompts`: the largest logit
    difference (absolute and relative to the largest logit), greedy agreement, the adapter's own effect."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load as mlx_load

    from ..models import load_model
    from .loader import load_adapter

    fused, tokenizer = mlx_load(str(fused_dir))
    ids = [tokenizer.encode(p) for p in prompts]
    got = [logits(fused, t) for t in ids]
    del fused
    model, _ = load_model(base, dequantize=False)
    load_adapter(model, Path(adapter_dir))
    want = [logits(model, t) for t in ids]
    lora = [m for _, m in model.named_modules() if hasattr(m, "lora_b")]
    scales = [m.scale for m in lora]
    for m in lora:
        m.scale = 0.0  # the base alone, without loading it again
    plain = [logits(model, t) for t in ids]
    for m, s in zip(lora, scales):
        m.scale = s
    mx.clear_cache()
    peak = max(float(np.abs(w).max()) for w in want)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    effect = max(float(np.abs(p - w).max()) for p, w in zip(plain, want))
    agree = float(np.mean(np.concatenate([(g.argmax(-1) == w.argmax(-1)) for g, w in zip(got, want)])))
    kind = weight_kind(Path(fused_dir))
    limit = TOLERANCE.get(kind, TOLERANCE["4-bit"]) if tolerance is None else tolerance
    rel = diff / peak if peak else diff
    quantized = kind.endswith("-bit")
    ok = rel <= limit and (not quantized or (diff <= EFFECT_SHARE * effect and agree >= MIN_AGREEMENT))
    return {"check": "fused logits vs base + adapter", "weights": kind, "prompts": list(prompts),
            "max_abs_diff": diff, "max_rel_diff": rel, "adapter_effect_rel": effect / peak if peak else effect,
            "diff_vs_effect": diff / effect if effect else None, "argmax_agreement": agree, "tolerance_rel": limit,
            "effect_share": EFFECT_SHARE if quantized else None, "ok": ok}


def logits(model: Any, tokens: list[int]) -> Any:
    import mlx.core as mx
    import numpy as np

    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def summary(result: dict[str, Any]) -> str:
    """One line for the CLI and the page."""
    if "max_rel_diff" in result:
        advice = ADVICE.get(result["weights"], "the fuse is wrong: report it")
        verdict = "OK" if result["ok"] else (f"WARNING: beyond the tolerance; the fused model answers "
                                             f"differently, {advice}")
        share = f", at most {result['effect_share']:.0%} of that" if result.get("effect_share") else ""
        least = f" (at least {MIN_AGREEMENT:.0%})" if result.get("effect_share") else ""
        return (f"fused vs base + adapter ({result['weights']}): largest logit difference {result['max_abs_diff']:.3g} "
                f"({result['max_rel_diff']:.2%} of the largest logit; tolerance {result['tolerance_rel']:.2%}; "
                f"the adapter itself moves them {result['adapter_effect_rel']:.2%}{share}), greedy tokens agree "
                f"{result['argmax_agreement']:.0%}{least}: {verdict}")
    return result.get("summary", json.dumps(result))


def write_check(folder: Path, results: dict[str, Any]) -> Path:
    """check.json in the export folder: each check's result and whether all passed."""
    results = {**results, "ok": all(r.get("ok", True) for r in results.values() if isinstance(r, dict))}
    atomic_write_json(Path(folder) / CHECK_FILE, results)
    return Path(folder) / CHECK_FILE


def read_check(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / CHECK_FILE).read_text())
    except (OSError, ValueError):
        return None
