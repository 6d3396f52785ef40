"""--format gguf for a family llama.cpp's converter here does not cover but Ollama imports adapters of (gemma2): the
adapter is written for Ollama instead of a GGUF (lora_app/adapters/ollama_adapter.py). A tiny random gemma2 model
(mlx-lm's class, the tests' tokenizer), an adapter made by our own LoRA code, exported through the CLI: the PEFT
files read back, the folder Ollama reads holds the same tensors under the file name Ollama looks for, each tensor
gets a name llama.cpp knows under Ollama's renaming table (written out here independently), the Modelfile's FROM
and ADAPTER lines point at the right things, and transformers + peft give our logits with the PEFT copy. A tiny
mixtral (a llama to Ollama's converter) goes the same way. Families neither path covers, and what Ollama itself
would refuse (a router's adapter, a fractional alpha, --quantize), are refused with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny
from test_export import PEFT_TOL, cli, load, mlx_logits, random_adapter, rel_err

from lora_app.adapters import ExportError, export_adapter
from lora_app.adapters.check import read_check

GEMMA2 = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
          "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "rms_norm_eps": 1e-6, "vocab_size": 384, "rope_theta": 10000.0, "attn_logit_softcapping": 50.0,
          "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16, "sliding_window": 4096,
          "max_position_embeddings": 2048, "hidden_activation": "gelu_pytorch_tanh", "torch_dtype": "float32",
          "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
MIXTRAL = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 64,
           "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-5, "vocab_size": 384, "rope_theta": 10000.0, "num_local_experts": 4,
           "num_experts_per_tok": 2, "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 0,
           "eos_token_id": 2}
MODULES = ["q_proj", "v_proj", "down_proj"]
# What Ollama's adapter converter should call each adapted module (llama.cpp's names), written out by hand
OLLAMA = {"self_attn.q_proj": "attn_q", "self_attn.v_proj": "attn_v", "mlp.down_proj": "ffn_down"}


def tiny_gemma2(folder: Path) -> Path:
    return tiny_family(folder, GEMMA2)


def tiny_family(folder: Path, config: dict) -> Path:
    """Random weights of mlx-lm's class for config's model_type, the tests' tokenizer."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    folder.mkdir(parents=True)
    tiny.build_tokenizer(folder, config["vocab_size"])
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def gemma2_adapter(tmp_path_factory) -> tuple[Path, Path]:
    """(base, adapter): random non-zero B on q, v and down of both blocks, saved by our saver."""
    root = tmp_path_factory.mktemp("gemma2")
    base = tiny_gemma2(root / "base")
    return base, random_adapter(base, root / "adapter", "all", MODULES)


@pytest.fixture(scope="module")
def exported(gemma2_adapter: tuple[Path, Path], engine_env: dict, tmp_path_factory) -> tuple[Path, str]:
    """The CLI's export --format gguf of the gemma2 adapter (no --ollama-base): (folder, stdout)."""
    _, adapter = gemma2_adapter
    out = tmp_path_factory.mktemp("gemma2-export") / "gemma-dates"
    done = cli(["export", "--adapter", str(adapter), "--format", "gguf", "--out", str(out)], engine_env)
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def test_gguf_of_gemma2_writes_an_adapter_for_ollama(gemma2_adapter, exported) -> None:
    from safetensors.numpy import load_file

    from lora_app.adapters.ollama_adapter import ollama_name

    base, adapter = gemma2_adapter
    out, stdout = exported
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["Modelfile", "check.json", "ollama-adapter/adapter_config.json",
                     "ollama-adapter/model.safetensors", "peft/adapter_config.json", "peft/adapter_model.safetensors",
                     "peft/check.json"]
    assert not list(out.glob("*.gguf"))

    # The PEFT copy read back: PEFT's names and orientation, equal to our adapter's tensors.
    ours = load_file(str(adapter / "adapters.safetensors"))
    peft = load_file(str(out / "peft" / "adapter_model.safetensors"))
    assert len(peft) == len(ours) == 12
    for name, w in ours.items():
        path, ab = name.rsplit(".lora_", 1)
        np.testing.assert_array_equal(peft[f"base_model.model.{path}.lora_{ab.upper()}.weight"], w.T)
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 12 and config["r"] == 4 and config["base_model_name_or_path"] == str(base)

    # The folder Ollama reads: since Ollama 0.12.11 it takes only model*.safetensors from an ADAPTER folder.
    ollama = out / "ollama-adapter"
    assert (ollama / "model.safetensors").read_bytes() == (out / "peft" / "adapter_model.safetensors").read_bytes()
    assert json.loads((ollama / "adapter_config.json").read_text()) == config
    expected = {f"blk.{b}.{OLLAMA[m]}.weight.lora_{ab}" for b in (0, 1) for m in OLLAMA for ab in "ab"}
    assert {ollama_name(n) for n in peft} == expected

    # The Modelfile: FROM to be filled in (it says with what), ADAPTER the folder above, the chat template.
    lines = (out / "Modelfile").read_text().splitlines()
    assert "FROM <base model in Ollama>" in lines and "ADAPTER ./ollama-adapter" in lines
    assert any(str(base) in ln and ln.startswith("# FROM must name the model") for ln in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines and any(ln.startswith('TEMPLATE """') for ln in lines)
    assert (out / lines[lines.index("ADAPTER ./ollama-adapter")].split(" ", 1)[1]).resolve() == ollama.resolve()

    # check.json and the CLI say an adapter was written instead of a GGUF, and what to do before ollama create.
    check = read_check(out)
    assert check["ok"] and check["peft"]["ok"] and check["ollama_adapter"]["ok"]
    assert check["ollama_adapter"]["written"] == "adapter" and check["ollama_adapter"]["instead_of"] == "gguf"
    assert check["ollama_adapter"]["tensors"] == 12 and check["modelfile"]["from"] is None
    printed = stdout.splitlines()
    assert printed[0] == f"wrote {out}" and printed[1].startswith("No GGUF for gemma2")
    assert printed[-1] == (f"Ollama: first replace the FROM line of {out.resolve() / 'Modelfile'} with {base} as "
                           f"Ollama names it (or export again with --ollama-base NAME), then: ollama create "
                           f"gemma-dates -f {out.resolve() / 'Modelfile'}")


def test_ollama_base_goes_on_the_from_line(gemma2_adapter, tmp_path: Path) -> None:
    _, adapter = gemma2_adapter
    out = export_adapter(adapter, "gguf", tmp_path / "named", ollama_base="gemma2:2b")
    lines = (out / "Modelfile").read_text().splitlines()
    assert lines[1:3] == ["FROM gemma2:2b", "ADAPTER ./ollama-adapter"]
    modelfile = read_check(out)["modelfile"]
    assert modelfile["from"] == "gemma2:2b" and modelfile["todo"] is None
    # One Modelfile word only: a newline would add commands of its own.
    with pytest.raises(ExportError, match="without spaces or quotes"):
        export_adapter(adapter, "gguf", tmp_path / "evil", ollama_base="gemma2:2b\nSYSTEM hi")
    with pytest.raises(ExportError, match="--format gguf only"):
        export_adapter(adapter, "peft", tmp_path / "peft", ollama_base="gemma2:2b")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "peft").exists()


def test_peft_copy_matches_transformers_gemma2(gemma2_adapter, exported) -> None:
    """transformers' Gemma2ForCausalLM on the same tiny weights, with peft loading the exported copy, gives our
    logits (MLX base + adapter) within the PEFT tests' tolerance; without the adapter it does not."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base, adapter = gemma2_adapter
    out, _ = exported
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
    tokens = [[5, 17, 42, 99, 120, 7, 250, 31, 64, 200, 11, 3]]
    with torch.no_grad():
        plain = model.eval()(torch.tensor(tokens)).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(model, str(out / "peft")).eval()
        theirs = adapted(torch.tensor(tokens)).logits.numpy()
    ours = mlx_logits(load(base, adapter), tokens)
    assert rel_err(plain, mlx_logits(load(base), tokens)) < PEFT_TOL  # the same base model on both sides
    assert rel_err(theirs, ours) < PEFT_TOL
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert rel_err(plain, ours) > 20 * PEFT_TOL  # the adapter matters, so the check above could fail


def test_mixtral_attention_adapter_goes_to_ollama_its_router_is_refused(tmp_path: Path) -> None:
    """Mixtral is a llama to Ollama's adapter converter: an adapter on attention is written for it; one on the
    experts' router has tensors that table does not rename, and is refused with nothing written."""
    base = tiny_family(tmp_path / "base", MIXTRAL)
    adapter = random_adapter(base, tmp_path / "attention", "all", ["q_proj", "v_proj"])
    check = read_check(export_adapter(adapter, "gguf", tmp_path / "out", ollama_base="mixtral:8x7b"))
    assert check["ok"] and check["ollama_adapter"]["ollama_architecture"] == "llama"
    assert check["ollama_adapter"]["tensors"] == 8 and check["modelfile"]["from"] == "mixtral:8x7b"
    router = random_adapter(base, tmp_path / "router", "all", ["q_proj", "gate"])
    with pytest.raises(ExportError, match=r"this adapter also has [^ ]*layers\.0\.block_sparse_moe\.gate\.lora_A"):
        export_adapter(router, "gguf", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


# ---- refused before anything is written -------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["phi3", "gemma", "frobnicator"])
def test_families_neither_path_covers_are_refused(model_type: str, tiny_adapter: Path, tiny_model: Path,
                                                  engine_env: dict, tmp_path: Path) -> None:
    """The tiny llama's folder, its config.json saying another family: --format gguf names both options it lacks."""
    other = tmp_path / "base"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    out = tmp_path / "exports" / "out"
    done = cli(["export", "--adapter", str(tiny_adapter), "--model", str(other), "--format", "gguf", "--out",
                str(out)], engine_env)
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: this model is '{model_type}': the GGUF export covers neither a whole GGUF")
    assert "llama, mistral, qwen2, qwen3" in error and "Ollama imports safetensors adapters of gemma2, mixtral" in error
    assert error.endswith("Export --format mlx (LM Studio, mlx-lm) or --format peft (transformers) instead")
    if model_type == "gemma":
        assert "Ollama's docs list Gemma 1, but its adapter converter takes only llama and gemma2 bases" in error
    assert not out.exists() and not (tmp_path / "exports").exists()


def test_what_ollama_would_refuse_is_refused(gemma2_adapter, tmp_path: Path) -> None:
    from lora_app.adapters.ollama_adapter import tensor_problem

    _, adapter = gemma2_adapter
    with pytest.raises(ExportError, match="no base weights to quantize"):
        export_adapter(adapter, "gguf", tmp_path / "q8", quantize=8)
    # Ollama reads lora_alpha as an unsigned integer
    fractional = tmp_path / "fractional"
    shutil.copytree(adapter, fractional)
    config = json.loads((fractional / "adapter_config.json").read_text())
    config["lora_app"]["alpha"] = 12.5
    config["lora_parameters"]["scale"] = 12.5 / 4
    (fractional / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="alpha 12.5: Ollama reads lora_alpha as a whole number"):
        export_adapter(fractional, "gguf", tmp_path / "alpha")
    assert not (tmp_path / "q8").exists() and not (tmp_path / "alpha").exists()
    # Names Ollama's table leaves alone: DoRA's magnitudes, Mixtral's router
    dora = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    router = "base_model.model.model.layers.1.block_sparse_moe.gate.lora_A.weight"
    fine = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    assert tensor_problem([fine], 16) is None
    problem = tensor_problem([fine, dora, router], 16)
    assert problem.startswith("Ollama's adapter converter knows only LoRA (not DoRA)")
    assert f"this adapter also has {dora}, {router}." in problem


def test_save_step_checks_both_paths_before_writing(gemma2_adapter, tiny_adapter: Path, monkeypatch) -> None:
    """The page's pre-check: a gemma2 adapter needs no converter (it is written for Ollama), a llama one does;
    4-bit is refused for both, each with its own reason."""
    from lora_app.ui import save_step

    _, adapter = gemma2_adapter
    monkeypatch.setattr(save_step, "setup_problem", lambda: "GGUF export needs llama.cpp's converter")
    assert save_step.gguf_problem(str(adapter), "as the base model") is None
    assert "no base weights to quantize" in save_step.gguf_problem(str(adapter), "4-bit")
    assert save_step.gguf_problem(str(tiny_adapter), "as the base model") == "GGUF export needs llama.cpp's converter"
    assert "llama-quantize" in save_step.gguf_problem(str(tiny_adapter), "4-bit")
