"""The Model step's catalog: models on disk, then a short curated list (model_catalog.json), then any hub repo id;
each with its size, parameters, quantization, license and a training-memory verdict for this machine.

Everything here works from config.json fields alone, so a model is sized before a byte of its weights is
downloaded. Imports neither gradio nor mlx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEMO, LoraConfig, full_module_name
from .lora import LoraError, count_for, parse_layers
from .memory import dtype_bytes_of, estimate_training_memory, human, verdict, weight_bytes

CATALOG_FILE = Path(__file__).with_name("model_catalog.json")
# SmolLM2-135M-Instruct as the demo builds it from the GGUF (Q4_1: 4 bits, groups of 32), for sizing the demo
# before its folder exists.
DEMO_CONFIG = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
               "tie_word_embeddings": True, "quantization": {"group_size": 32, "bits": 4}}
VERDICT_MARK = {"fits": "✅ fits", "tight": "⚠️ tight", "does not fit": "❌ does not fit"}
COLUMNS = ["Model", "Where", "Parameters", "Quantization", "Download", "License", "Training memory", "Verdict"]


@dataclass
class Entry:
    """One catalog row: `name` is what goes into the Model field (demo, a repo id or a folder)."""

    name: str
    where: str  # "built in" | "on disk" | "catalog" | "hub"
    config: dict[str, Any]
    size_bytes: int | None = None  # the files on disk or the hub's listing; None: computed from the config
    license: str = ""
    gated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    """The form's values the estimate depends on."""

    rank: int = 8
    modules: list[str] = field(default_factory=lambda: list(LoraConfig().modules))
    layers: str = "all"
    batch_size: int = 4
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    longest_row: int | None = None  # tokens in the data's longest row, once the Data step has previewed it
    backend: str = "gpu"  # where training runs: "gpu" (Metal / CUDA) or "cpu"
    method: str = "lora"  # lora | dora | full (what is trained decides the optimizer's state)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs (Gemma 3, ...) keep the language model's fields under text_config."""
    return {**config, **config.get("text_config", {})}


def module_shapes(config: dict[str, Any]) -> dict[str, list[int]]:
    """[out, in] of each linear module in a block, from config.json (llama-family names; Phi-3's fused ones)."""
    c = text_config(config)
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    inter = int(c.get("intermediate_size") or 4 * hidden)
    if c.get("model_type") == "phi3":
        return {"self_attn.qkv_proj": [(heads + 2 * kv) * head_dim, hidden],
                "self_attn.o_proj": [hidden, heads * head_dim],
                "mlp.gate_up_proj": [2 * inter, hidden], "mlp.down_proj": [hidden, inter]}
    return {"self_attn.q_proj": [heads * head_dim, hidden], "self_attn.k_proj": [kv * head_dim, hidden],
            "self_attn.v_proj": [kv * head_dim, hidden], "self_attn.o_proj": [hidden, heads * head_dim],
            "mlp.gate_proj": [inter, hidden], "mlp.up_proj": [inter, hidden], "mlp.down_proj": [hidden, inter]}


def info_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """What the memory estimate needs (the keys of models.ModelInfo), computed from config.json alone."""
    c = text_config(config)
    shapes = module_shapes(c)
    hidden, vocab, blocks = int(c["hidden_size"]), int(c.get("vocab_size") or 0), int(c["num_hidden_layers"])
    per_block = sum(o * i for o, i in shapes.values()) + 2 * hidden  # the linear modules and two norms
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", True) else 2)
    return {
        "architecture": c.get("model_type", ""),
        "num_blocks": blocks,
        "hidden_size": hidden,
        "num_heads": int(c["num_attention_heads"]),
        "num_kv_heads": int(c.get("num_key_value_heads") or c["num_attention_heads"]),
        "head_dim": int(c.get("head_dim") or hidden // int(c["num_attention_heads"])),
        "vocab_size": vocab,
        "intermediate_size": int(c.get("intermediate_size") or 0),
        "total_params": blocks * per_block + embeddings + hidden,
        "dtype": str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
        "quantization": c.get("quantization") or c.get("quantization_config"),
        "module_shapes": shapes,
        "linear_modules": sorted(shapes),
    }


def read_config(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def folder_bytes(folder: Path) -> int:
    """The weights and tokenizer a model folder holds (links into the hub cache followed)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def curated() -> list[Entry]:
    data = json.loads(CATALOG_FILE.read_text(encoding="utf-8"))
    return [Entry(m["repo"], "catalog", m["config"], license=m.get("license", ""), gated=bool(m.get("gated")))
            for m in data["models"]]


def local_entries(models_dir: Path | None, cached: list[dict[str, Any]], demo_folder: Path | None) -> list[Entry]:
    """The demo, the hub cache's complete models (`hub.cached_models()`) and the models folder's folders."""
    demo_config = read_config(demo_folder) if demo_folder else None
    entries = [Entry(DEMO, "built in", demo_config or DEMO_CONFIG, license="apache-2.0")]
    for model in cached:
        config = read_config(Path(model["path"]))
        if config:
            entries.append(Entry(model["repo"], "on disk", config, size_bytes=int(model.get("size_bytes") or 0)))
    if models_dir and Path(models_dir).is_dir():
        for folder in sorted(Path(models_dir).iterdir()):
            config = read_config(folder) if folder.is_dir() else None
            if config:
                entries.append(Entry(str(folder), "on disk", config, size_bytes=folder_bytes(folder)))
    return entries


def entries(models_dir: Path | None, cached: list[dict[str, Any]], demo_folder: Path | None,
            checked: list[Entry] = ()) -> list[Entry]:
    """On disk first, then repo ids the user checked on the hub, then the curated list (less what is on disk)."""
    local = local_entries(models_dir, cached, demo_folder)
    seen = {e.name for e in local}
    rest = [e for e in [*checked, *curated()] if e.name not in seen and not seen.add(e.name)]
    return local + rest


def chosen_modules(wanted: list[str], shapes: dict[str, list[int]]) -> list[str]:
    """The form's modules this model has; else the default ones it has; else its attention modules (Phi-3's
    fused qkv_proj has no q_proj)."""
    for names in (wanted, LoraConfig().modules):
        found = [m for m in (full_module_name(n) for n in names or []) if m in shapes]
        if found:
            return found
    return [m for m in shapes if m.startswith("self_attn.")][:1]


def estimate(info: dict[str, Any], s: Settings) -> dict[str, int]:
    """Training memory for a model (info_from_config's dict) at the form's settings
    (memory.estimate_training_memory's dict)."""
    try:
        blocks = parse_layers(s.layers, info["num_blocks"])
    except LoraError:
        blocks = list(range(info["num_blocks"]))  # a spec for another model (last:40 of 30 blocks): size them all
    modules = chosen_modules(s.modules, info["module_shapes"])
    trainable = count_for(info["module_shapes"], modules, len(blocks), s.rank, s.method)
    return estimate_training_memory(info, trainable, s.batch_size, s.max_seq_length, s.grad_checkpoint,
                                    longest_row=s.longest_row, backend=s.backend, modules=modules,
                                    blocks_trained=info["num_blocks"] - min(blocks, default=0))


def download_bytes(entry: Entry, info: dict[str, Any]) -> int:
    """The hub's number when known; else the weights as the config (`info`) describes them (within a few percent:
    the tokenizer and the odd unquantized norm are left out)."""
    return entry.size_bytes or weight_bytes(info, dtype_bytes_of(info))


def parameters_text(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def quantization_text(info: dict[str, Any]) -> str:
    q = info.get("quantization")
    return f"{q['bits']}-bit" if q and q.get("bits") else info["dtype"]


def row(entry: Entry, s: Settings, available: int) -> list[str]:
    info = info_from_config(entry.config)
    est = estimate(info, s)
    approx = "" if entry.size_bytes else "≈ "  # computed from the config, not listed by the hub
    license_text = (entry.license or "-") + (" · gated: needs a token" if entry.gated else "")
    verdict_text = VERDICT_MARK[verdict(est["total"], available)] if available else "unknown"
    return [entry.name, entry.where, parameters_text(info["total_params"]), quantization_text(info),
            approx + human(download_bytes(entry, info)),
            license_text, f"about {human(est['total'])}", verdict_text]


def table(all_entries: list[Entry], s: Settings, available: int) -> list[list[str]]:
    return [row(e, s, available) for e in all_entries]
