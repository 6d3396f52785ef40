"""The GGUF families other than the demo's llama (lora_app/adapters/gguf.py FAMILIES): a tiny random model of each,
with the demo model's tokenizer (the converter recognises its pre-tokenizer; a tokenizer trained in the test
would not be), fused with a random adapter, converted by llama.cpp's converter, and read back: every tensor's
name, shape and value matches (qwen3's q/k norms included, mistral's q/k rows in llama.cpp's order)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_export import random_adapter

from lora_app import demo
from lora_app.adapters import export_adapter
from lora_app.adapters.check import read_check

SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 49152, "max_position_embeddings": 2048,
         "rope_theta": 10000.0, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
# qwen2 is left out: under model_type qwen2, transformers loads this tokenizer as its Qwen2 class, whose
# pre-tokenizer the converter does not recognise for these files (a real Qwen2 tokenizer it does).
FAMILIES = {
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": True, "head_dim": 16},
    "mistral": {"architectures": ["MistralForCausalLM"], "tie_word_embeddings": False, "head_dim": 16},
}


def tiny_family(folder: Path, model_type: str) -> Path:
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = {"model_type": model_type, **SHAPE, **FAMILIES[model_type]}
    module = importlib.import_module(f"mlx_lm.models.{'llama' if model_type == 'mistral' else model_type}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    folder.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo.demo_model_dir() / name).is_file():
            shutil.copy(demo.demo_model_dir() / name, folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_converts_and_reads_back(model_type: str, tmp_path: Path) -> None:
    try:
        demo.gguf_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    from lora_app.adapters.gguf import setup

    setup(log=lambda _m: None)
    base = tiny_family(tmp_path / "base", model_type)
    adapter = random_adapter(base, tmp_path / "adapter", "all", ["q_proj", "k_proj", "v_proj"])
    out = export_adapter(adapter, "gguf", tmp_path / "out")
    check = read_check(out)
    assert check["fuse"]["ok"], check["fuse"]
    assert check["gguf"]["ok"], check["gguf"]["problems"]
    arch = {"mistral": "llama"}.get(model_type, model_type)
    assert check["gguf"]["architecture"] == arch
    expected = {"qwen3": 2 + 2 * 11, "mistral": 3 + 2 * 9}[model_type]  # top-level + blocks x per block
    assert check["gguf"]["tensors"] == expected
