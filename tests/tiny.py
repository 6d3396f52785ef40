"""Tiny offline models and datasets for tests and benchmarks: a byte-level BPE trained here, random llama weights.

Nothing downloads; a model folder is built in well under a second and loads with `mlx_lm.load(path)`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = "the a cat dog bird sat ran flew on under over mat log tree red blue green big small".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """A tiny grammar: learnable structure, so a few steps of LoRA visibly lower the loss."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        adj, noun = rng.choice(WORDS[13:]), rng.choice(WORDS[2:5])
        verb, prep, place = rng.choice(WORDS[5:8]), rng.choice(WORDS[8:11]), rng.choice(WORDS[11:13])
        out.append(f"the {adj} {noun} {verb} {prep} the {place} .")
    return out


def build_tokenizer(folder: Path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = sentences(400) + ["What is the answer? Reply with one word. user assistant system"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def build_tiny_model(folder: Path, layers: int = 2, hidden: int = 64, seed: int = 0,
                     vocab_size: int = 384, quantize: bool = False) -> Path:
    """A llama-shaped model with random weights (optionally 4-bit quantized, for QLoRA tests)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, vocab_size)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "intermediate_size": hidden * 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab_size, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "max_position_embeddings": 2048, "torch_dtype": "float32",
        "eos_token_id": SPECIAL.index("<|im_end|>"), "bos_token_id": 0,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4}
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_text_data(folder: Path, n_train: int = 64, n_valid: int = 16) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", [{"text": s} for s in sentences(n_train, seed=1)])
    write_jsonl(folder / "valid.jsonl", [{"text": s} for s in sentences(n_valid, seed=2)])
    write_jsonl(folder / "test.jsonl", [{"text": s} for s in sentences(n_valid, seed=3)])
    return folder


def build_chat_data(folder: Path, n_train: int = 48, n_valid: int = 12) -> Path:
    """Multi-turn chat: the assistant repeats the noun of each user sentence."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def rows(n: int, seed: int) -> list[dict]:
        out = []
        for i, s in enumerate(sentences(2 * n, seed)[::2]):
            other = sentences(2 * n, seed)[2 * i + 1]
            out.append({"messages": [
                {"role": "user", "content": s}, {"role": "assistant", "content": s.split()[2]},
                {"role": "user", "content": other}, {"role": "assistant", "content": other.split()[2]},
            ]})
        return out

    write_jsonl(folder / "train.jsonl", rows(n_train, 1))
    write_jsonl(folder / "valid.jsonl", rows(n_valid, 2))
    return folder


def build_tiny_adapter(folder: Path, model: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0,
                       b_scale: float = 0.5) -> Path:
    """An adapter without training: q/v of every block, B drawn at random (not zero), so its answers differ from the
    base model's. Written by our saver, in mlx-lm's layout."""
    import mlx.core as mx

    from lora_app.adapters import adapter_config, save_adapter
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.lora_layer import LoRALinear
    from lora_app.models import blocks_of, load_model

    mlx_model, _ = load_model(str(model))
    lora = LoraConfig(rank=rank, alpha=alpha, modules=["q_proj", "v_proj"], layers="all")
    targets = apply_lora(mlx_model, lora, seed=seed)
    for _, layer in mlx_model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * b_scale
    config = adapter_config(lora, targets, len(blocks_of(mlx_model)), str(model))
    return save_adapter(mlx_model, Path(folder), config)
