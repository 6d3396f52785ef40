"""Exports checked by the tools that read them: transformers + peft load our PEFT files and give our logits,
mlx_lm.load reads fused folders and gives the adapter model's logits, PEFT import round-trips exactly."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import runhelp
import tiny

from lora_app.adapters import AdapterError, ExportError, adapter_config, export_adapter, load_adapter, save_adapter
from lora_app.config import LoraConfig
from lora_app.lora import adapter_tensors, apply_lora

TOKENS = [[5, 17, 42, 99, 120, 7, 250, 31, 64, 200, 11, 3]]
PEFT_TOL = 1e-4  # float32 MLX vs float32 PyTorch: measured 3e-7 (max abs error / max abs logit)
FUSE_TOL = 1e-4  # float merge: measured 4e-7 (float base), 5e-7 (de-quantized 4-bit base)
REQUANT_TOL = 0.35  # merged weight re-quantized to 4 bits: measured 0.2 (the adapter itself moves logits 1.2)


# ---- helpers -----------------------------------------------------------------------------------------------

def mlx_logits(model, tokens: list[list[int]] = TOKENS) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(tokens)).astype(mx.float32))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def load(model_dir: Path, adapter: Path | None = None, dequantize: bool = False):
    from lora_app.models import load_model

    model, _ = load_model(str(model_dir), dequantize=dequantize)
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def random_adapter(model_dir: Path, out: Path, layers: str, modules: list[str], seed: int = 0) -> Path:
    """An adapter with random non-zero B (a zero B would make every comparison pass trivially)."""
    import mlx.core as mx

    model = load(model_dir)
    lora = LoraConfig(rank=4, alpha=12.0, modules=modules, layers=layers)
    targets = apply_lora(model, lora, seed=seed)
    weights = {name: mx.random.normal(value.shape) * 0.2 if name.endswith("lora_b") else value
               for name, value in adapter_tensors(model).items()}
    config = adapter_config(lora, targets, len(model.layers), str(model_dir))
    return save_adapter(model, out, config, weights)


def torch_logits(base_dir: Path, peft_dir: Path | None = None) -> np.ndarray:
    """transformers' LlamaForCausalLM (float32) on the base folder, with the PEFT adapter when given."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, str(peft_dir))
    with torch.no_grad():
        return model.eval()(torch.tensor(TOKENS)).logits.float().numpy()


cli = functools.partial(runhelp.cli, timeout=300)  # exports load and fuse a model: slower than most


def peft_export(adapter: Path, out: Path, env: dict) -> tuple[dict, dict]:
    """`export --format peft` through the CLI: (adapter_config.json, the tensors of adapter_model.safetensors)."""
    from safetensors.numpy import load_file

    done = cli(["export", "--adapter", str(adapter), "--format", "peft", "--out", str(out)], env)
    assert done.returncode == 0, done.stderr
    return (json.loads((out / "adapter_config.json").read_text()),
            load_file(str(out / "adapter_model.safetensors")))


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_model: Path, text_data: Path, engine_env: dict, tmp_path_factory) -> Path:
    """An adapter trained by our CLI on block 1 only, with a square (q), a narrow (v) and a wide (down) module."""
    run = tmp_path_factory.mktemp("export") / "run"
    done = cli(["train", "--model", str(tiny_model), "--data", str(text_data), "--out", str(run), "--iters", "5",
                "--learning-rate", "1e-2", "--batch-size", "2", "--layers", "1", "--modules",
                "q_proj,v_proj,down_proj", "--steps-per-eval", "0", "--save-every", "5"], engine_env)
    assert done.returncode == 0, done.stderr
    return run / "adapters"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A base with other shapes (hidden 32 instead of 64): adapters for tiny_model must not load into it."""
    return tiny.build_tiny_model(tmp_path_factory.mktemp("other-model"), hidden=32)


# ---- PEFT, verified by transformers + peft -------------------------------------------------------------------

def test_peft_export_matches_transformers_peft(trained: Path, tiny_model: Path, engine_env: dict,
                                               tmp_path: Path) -> None:
    out = tmp_path / "peft"
    config, tensors = peft_export(trained, out, engine_env)
    ours = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["lora_alpha"] / config["r"] == ours["lora_parameters"]["scale"]
    assert config["layers_to_transform"] == [1]
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    down = "base_model.model.model.layers.1.mlp.down_proj"
    assert tensors[f"{down}.lora_A.weight"].shape == (8, 128)  # [rank, in]
    assert tensors[f"{down}.lora_B.weight"].shape == (64, 8)  # [out, rank]
    assert np.abs(tensors[f"{down}.lora_B.weight"]).max() > 1e-3  # trained: B moved away from zero

    ours_logits = mlx_logits(load(tiny_model, trained))
    theirs = torch_logits(tiny_model, out)
    base = torch_logits(tiny_model)
    assert rel_err(theirs, ours_logits) < PEFT_TOL
    assert (theirs.argmax(-1) == ours_logits.argmax(-1)).all()
    assert rel_err(base, ours_logits) > 20 * PEFT_TOL  # the adapter matters, so the check above can fail

    # A wrong alpha (PEFT scales by lora_alpha / r) must show: this test would catch it.
    wrong = tmp_path / "wrong-alpha"
    shutil.copytree(out, wrong)
    config["lora_alpha"] *= 2
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    assert rel_err(torch_logits(tiny_model, wrong), ours_logits) > 10 * PEFT_TOL

    again = cli(["export", "--adapter", str(trained), "--format", "peft", "--out", str(out)], engine_env)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_peft_round_trip_gives_same_logits(tiny_model: Path, tmp_path: Path) -> None:
    adapter = random_adapter(tiny_model, tmp_path / "adapter", "all", ["q_proj", "k_proj", "gate_proj"])
    out = export_adapter(adapter, "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] is None and config["lora_alpha"] == 12 and config["r"] == 4

    model = load(tiny_model)
    lora, targets = load_adapter(model, out)
    assert (lora.rank, lora.alpha, targets.blocks) == (4, 12.0, [0, 1])
    assert targets.modules == ["mlp.gate_proj", "self_attn.k_proj", "self_attn.q_proj"]
    expected = mlx_logits(load(tiny_model, adapter))
    np.testing.assert_allclose(mlx_logits(model), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert rel_err(mlx_logits(load(tiny_model)), expected) > 1e-2  # the adapter changes the output


# ---- fused models, verified by mlx_lm.load -------------------------------------------------------------------

def test_fused_float_matches_adapter(tiny_model: Path, tmp_path: Path) -> None:
    from mlx_lm import load as mlx_load

    adapter = random_adapter(tiny_model, tmp_path / "adapter", "0", ["q_proj", "o_proj", "up_proj"])
    out = export_adapter(adapter, "fused", tmp_path / "fused")
    fused, tokenizer = mlx_load(str(out))
    assert tokenizer.encode("the cat sat") == tiny_tokens(tiny_model, "the cat sat")
    expected = mlx_logits(load(tiny_model, adapter))
    assert rel_err(mlx_logits(fused), expected) < FUSE_TOL
    assert (mlx_logits(fused).argmax(-1) == expected.argmax(-1)).all()
    assert rel_err(mlx_logits(load(tiny_model)), expected) > 20 * FUSE_TOL


def test_fuse_accepts_peft_adapter(tiny_model: Path, tmp_path: Path) -> None:
    from mlx_lm import load as mlx_load

    adapter = random_adapter(tiny_model, tmp_path / "adapter", "1", ["v_proj", "down_proj"])
    peft = export_adapter(adapter, "peft", tmp_path / "peft")
    out = export_adapter(peft, "fused", tmp_path / "fused")  # base from base_model_name_or_path
    expected = mlx_logits(load(tiny_model, adapter))
    assert rel_err(mlx_logits(mlx_load(str(out))[0]), expected) < FUSE_TOL


def test_fused_quantized_base(tiny_qmodel: Path, tmp_path: Path) -> None:
    from mlx_lm import load as mlx_load

    from lora_app.models import quantization_of

    adapter = random_adapter(tiny_qmodel, tmp_path / "adapter", "all", ["q_proj", "v_proj"])
    expected = mlx_logits(load(tiny_qmodel, adapter))  # the adapter on the 4-bit base (QLoRA)

    plain = export_adapter(adapter, "fused", tmp_path / "fused-float", dequantize=True)
    fused, _ = mlx_load(str(plain))
    assert quantization_of(fused) is None and "quantization" not in json.loads((plain / "config.json").read_text())
    assert rel_err(mlx_logits(fused), expected) < FUSE_TOL
    assert (mlx_logits(fused).argmax(-1) == expected.argmax(-1)).all()

    requant = export_adapter(adapter, "fused", tmp_path / "fused-4bit")
    fused4, _ = mlx_load(str(requant))
    assert quantization_of(fused4) == {"bits": 4, "group_size": 32}
    assert rel_err(mlx_logits(fused4), expected) < REQUANT_TOL
    assert (mlx_logits(fused4).argmax(-1) == expected.argmax(-1)).mean() >= 0.75


def tiny_tokens(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).encode(text)


# ---- bad inputs ----------------------------------------------------------------------------------------------

def test_export_refuses_non_empty_folder(tiny_model: Path, tmp_path: Path) -> None:
    adapter = random_adapter(tiny_model, tmp_path / "adapter", "all", ["q_proj"])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for fmt in ("peft", "fused"):
        with pytest.raises(ExportError, match="not empty"):
            export_adapter(adapter, fmt, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]  # no temporary folder left over
    with pytest.raises(ExportError, match="mlx and gguf only"):
        export_adapter(adapter, "peft", tmp_path / "new", dequantize=True)


def test_peft_for_another_base_is_refused(tiny_model: Path, other_model: Path, tmp_path: Path) -> None:
    adapter = random_adapter(tiny_model, tmp_path / "adapter", "all", ["q_proj", "v_proj"])
    out = export_adapter(adapter, "peft", tmp_path / "peft")
    with pytest.raises(AdapterError, match=r"does not match this model[\s\S]*shape"):
        load_adapter(load(other_model), out)

    config = json.loads((out / "adapter_config.json").read_text())
    config["r"] = 8
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="r=8 but the tensors have rank 4"):
        load_adapter(load(tiny_model), out)


# ---- the demo model (SmolLM2-135M) ---------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_peft_export_matches_transformers(tmp_path: Path) -> None:
    """The real model (30 blocks, GQA, tied embeddings) through PEFT; measured 3e-6, ~25 s with the demo cached.
    That its Q/K rows are in Hugging Face order, which a q_proj/k_proj adapter relies on, is test_demo.py's job."""
    from lora_app import demo

    try:
        demo.gguf_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    float_base = float_copy(demo.demo_model_dir(), tmp_path / "base")
    adapter = random_adapter(float_base, tmp_path / "adapter", "last:4", ["q_proj", "k_proj", "v_proj"])
    out = export_adapter(adapter, "peft", tmp_path / "peft")
    ours = mlx_logits(load(float_base, adapter))
    theirs = torch_logits(float_base, out)
    assert rel_err(theirs, ours) < PEFT_TOL
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert rel_err(torch_logits(float_base), ours) > 1e-2


def float_copy(model_dir: Path, out: Path) -> Path:
    """The demo's 4-bit folder de-quantized to float32, which transformers can read."""
    import mlx.core as mx
    from mlx_lm.utils import save

    from lora_app.adapters.fuse import merge, model_config
    from lora_app.models import load_model

    model, tokenizer = load_model(str(model_dir), dequantize=False)
    merge(model, dequantize=True)
    model.apply(lambda w: w.astype(mx.float32))
    save(out, str(model_dir), model, tokenizer, model_config(str(model_dir), dequantize=True), donate_model=False)
    return out
