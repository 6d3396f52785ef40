"""Ollama's own import of a safetensors LoRA adapter, for the model families the GGUF export (gguf.py) does not
cover: the adapter's tensors in a folder `ollama create` reads, and a Modelfile (modelfile.py) whose FROM names the
base model as Ollama has it and whose ADAPTER line points at that folder. Ollama converts the adapter itself.

What Ollama accepts, read in its source (github.com/ollama/ollama at fb30760, August 2026):
- convert/convert.go ConvertAdapter: the FROM model's GGUF architecture must be "llama" or "gemma2", else
  "unsupported architecture". Llama, Mistral and Mixtral bases are "llama" there; Gemma 1 is "gemma", which
  docs/import.md lists but the converter refuses. Llama and Mistral get a whole GGUF here instead (nothing to
  match by hand), so this path is for gemma2 and mixtral (ADAPTER_FAMILIES).
- convert_llama_adapter.go and convert_gemma2_adapter.go rename tensors with one fixed table (RENAMES): only the
  attention (q, k, v, o) and dense MLP (gate, up, down) projections of blocks. Anything else (DoRA's magnitudes,
  Mixtral's router or experts) keeps a name llama.cpp does not know, so every name is checked before writing.
- AdapterParameters reads lora_alpha as an unsigned integer: a fractional alpha fails there.
- parser/parser.go filesForModel: since Ollama 0.12.11 (commit 91ec3dd) a folder's weights are found only as
  model*.safetensors, so PEFT's adapter_model.safetensors is not found ("no Modelfile or safetensors files
  found", ollama/ollama#13314). The folder for Ollama (OLLAMA_DIR) holds the same file as model.safetensors beside
  adapter_config.json, and nothing else; PEFT_DIR keeps PEFT's own names for transformers and the Hub.

Imports neither MLX nor gradio: the page checks a model's family with it before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .gguf import FAMILIES, family_problem
from .reader import CONFIG_FILE, PEFT_WEIGHTS, tensor_shapes

ADAPTER_FAMILIES = {"gemma2": "gemma2", "mixtral": "llama"}  # model_type -> the base's architecture in Ollama
NOT_COVERED = {"gemma": "Ollama's docs list Gemma 1, but its adapter converter takes only llama and gemma2 bases"}
PEFT_DIR, OLLAMA_DIR, OLLAMA_WEIGHTS = "peft", "ollama-adapter", "model.safetensors"
# Ollama's Replacements() for adapters, in its order (the same for llama and gemma2)
RENAMES = (("base_model.model.", ""), ("model.layers", "blk"), ("self_attn.q_proj", "attn_q"),
           ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
           ("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up"),
           ("lora_A.weight", "weight.lora_a"), ("lora_B.weight", "weight.lora_b"), ("lora_a", "weight.lora_a"),
           ("lora_b", "weight.lora_b"))
KNOWN = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight\.lora_[ab]")
BASE_NAME = re.compile(r"[A-Za-z0-9._:/~@+-]{1,300}")  # one Modelfile word: a name or a path, no spaces or quotes


def writes_adapter(config: dict) -> bool:
    """Whether --format gguf writes an adapter for Ollama (rather than a GGUF) for this base model."""
    return config.get("model_type") in ADAPTER_FAMILIES


def gguf_format_problem(config: dict, quantize: int | None = None) -> str | None:
    """Why --format gguf can make neither a GGUF nor an adapter for Ollama of this base model (checked before
    anything is written), or None."""
    kind = config.get("model_type", "?")
    if kind in FAMILIES:
        return family_problem(config, quantize)
    if kind in ADAPTER_FAMILIES:
        if quantize:
            return (f"--quantize {quantize}: a {kind} model is exported for Ollama as an adapter, which has no base "
                    "weights to quantize (the base model Ollama has brings its own); leave --quantize out")
        return None
    why = f" ({NOT_COVERED[kind]})" if kind in NOT_COVERED else ""
    return (f"this model is {kind!r}: the GGUF export covers neither a whole GGUF (llama.cpp's converter here: "
            f"{', '.join(sorted(FAMILIES))}) nor an adapter for Ollama (Ollama imports safetensors adapters of "
            f"{', '.join(sorted(ADAPTER_FAMILIES))}){why}. Export --format mlx (LM Studio, mlx-lm) or --format peft "
            "(transformers) instead")


def base_problem(name: str | None) -> str | None:
    """Why `name` cannot go on the Modelfile's FROM line (it is written there as it is), or None."""
    if name is None or BASE_NAME.fullmatch(name):
        return None
    return (f"--ollama-base {name!r}: give an Ollama model name (such as gemma2:2b or hf.co/ORG/REPO:TAG) or a "
            "GGUF file's path, without spaces or quotes")


def ollama_name(peft_name: str) -> str:
    """The name Ollama's adapter converter gives a PEFT tensor: Go's strings.Replacer over RENAMES, which goes
    left to right and at each position uses the first pair, in order, whose old string starts there."""
    out, i = [], 0
    while i < len(peft_name):
        for old, new in RENAMES:
            if peft_name.startswith(old, i):
                out.append(new)
                i += len(old)
                break
        else:
            out.append(peft_name[i])
            i += 1
    return "".join(out)


def unknown_tensors(peft_names: Iterable[str]) -> list[str]:
    """The tensors whose Ollama name llama.cpp would not find in the base model."""
    return sorted(n for n in peft_names if not KNOWN.fullmatch(ollama_name(n)))


def tensor_problem(peft_names: Iterable[str], alpha: float) -> str | None:
    """Why Ollama could not convert an adapter with these PEFT tensor names and alpha, or None."""
    unknown = unknown_tensors(peft_names)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        return ("Ollama's adapter converter knows only LoRA (not DoRA) on the attention and MLP projections of "
                f"blocks (q/k/v/o_proj, gate/up/down_proj); this adapter also has {', '.join(unknown[:3])}{more}. "
                "Export --format mlx or --format peft instead")
    if float(alpha) != int(alpha):
        return (f"alpha {alpha:g}: Ollama reads lora_alpha as a whole number, so it would not convert this adapter; "
                "train with a whole alpha, or export --format mlx or --format peft instead")
    return None


def write_ollama_folder(peft_dir: Path, folder: Path) -> Path:
    """folder/model.safetensors (the PEFT file, byte for byte) and adapter_config.json: what `ollama create`
    finds in an ADAPTER folder."""
    folder.mkdir()
    shutil.copyfile(peft_dir / PEFT_WEIGHTS, folder / OLLAMA_WEIGHTS)
    shutil.copyfile(peft_dir / CONFIG_FILE, folder / CONFIG_FILE)
    return folder


def ollama_check(folder: Path, peft_dir: Path, model_type: str) -> dict[str, Any]:
    """The Ollama folder read back: only the two files Ollama takes, the same tensors as the PEFT export, every
    tensor named as Ollama's converter expects, lora_alpha a whole number."""
    shapes = tensor_shapes(folder / OLLAMA_WEIGHTS)
    unknown = unknown_tensors(shapes)
    alpha = json.loads((folder / CONFIG_FILE).read_text()).get("lora_alpha")
    problems = [f"{n}: not a name Ollama's converter maps" for n in unknown[:5]]
    if sha256(folder / OLLAMA_WEIGHTS) != sha256(peft_dir / PEFT_WEIGHTS):
        problems.append(f"{OLLAMA_WEIGHTS} differs from the PEFT export's {PEFT_WEIGHTS}")
    if not (isinstance(alpha, int) and alpha > 0):
        problems.append(f"lora_alpha {alpha!r} is not a whole number")
    files = sorted(p.name for p in folder.iterdir())
    if files != sorted([CONFIG_FILE, OLLAMA_WEIGHTS]):
        problems.append(f"the folder holds {files}, not only {CONFIG_FILE} and {OLLAMA_WEIGHTS}")
    arch = ADAPTER_FAMILIES.get(model_type, "?")
    return {"check": "Ollama adapter folder", "written": "adapter", "instead_of": "gguf", "model_type": model_type,
            "ollama_architecture": arch, "tensors": len(shapes), "problems": problems,
            "ok": bool(shapes) and not problems,
            "summary": f"No GGUF for {model_type} (llama.cpp's converter here covers {', '.join(sorted(FAMILIES))}): "
                       f"wrote an adapter that Ollama adds to its own {model_type} base model, {OLLAMA_DIR}/ "
                       f"({len(shapes)} tensors, named as Ollama's {arch} adapter converter expects, alpha "
                       f"{alpha}), and the same adapter for transformers in {PEFT_DIR}/"
                       + ("" if not problems else f"; {len(problems)} problems, e.g. {problems[0]}")}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
