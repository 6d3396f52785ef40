"""GGUF export of the demo model (SmolLM2-135M, a llama): llama.cpp's converter (fetched by `setup-gguf`), the file
read back by llama.cpp's `gguf` package with a name table written here, independently of lora_app, and compared
with the fused weights; the export's own check catches a changed tensor; the Modelfile carries the chat template;
the 4-bit MLX export answers as the adapter; llama.cpp itself, where llama-cpp-python is installed.

The adapter is a real one, so that greedy answers mean something: the `dates_adapter` fixture trains it on the demo
task with our CLI, `python -m lora_app train --model demo --data demo --out RUN --iters 30 --learning-rate 2e-3
--layers last:8 --mask-prompt --steps-per-eval 0 --save-every 30` (about 2.5 min on 2 CPU cores), once per test
session: the xdist workers share it through a file lock. Training is deterministic (the run's seed), so it answers
"Write 17 March 2023 as YYYY-MM-DD." with 2023-03-11 every time, the base model with 12/2023.

Slow (about a minute and a half after the training): the real model, fused three times, converted once. The
converter's first fetch takes ~20 s more."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import runhelp
from test_demo import _llama_cpp_permute

from lora_app import demo
from lora_app.adapters import export_adapter
from lora_app.adapters.check import read_check

BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
TRAIN = ["train", "--model", "demo", "--data", "demo", "--iters", "30", "--learning-rate", "2e-3", "--layers", "last:8",
         "--mask-prompt", "--steps-per-eval", "0", "--save-every", "30"]
cli = functools.partial(runhelp.cli, timeout=900)  # 30 steps of the real model on a busy 2-core machine


def hf_name(gguf_name: str) -> str:
    if gguf_name in TOP:
        return TOP[gguf_name]
    _, block, part, kind = gguf_name.split(".")
    return f"model.layers.{block}.{BLOCK[part]}.{kind}"


def session_folder(tmp_path_factory) -> Path:
    """A folder the whole test session shares: under xdist each worker has its own basetemp, all in one parent."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def dates_adapter(tmp_path_factory, engine_env: dict) -> Path:
    """The demo task's adapter, trained by our CLI once per session (the first worker trains, the others wait on
    the lock); trained into a temporary run folder and renamed, so a failed run is never taken for a finished one."""
    from filelock import FileLock

    try:
        demo.gguf_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    shared = session_folder(tmp_path_factory)
    run = shared / "demo-dates-run"
    with FileLock(str(shared / "demo-dates-run.lock")):
        if not run.is_dir():
            partial = shared / f"demo-dates-run.{os.getpid()}"
            done = cli([*TRAIN, "--out", str(partial)], engine_env)
            assert done.returncode == 0, done.stderr[-2000:]
            os.replace(partial, run)
    return run / "adapters"


@pytest.fixture(scope="module")
def exported(dates_adapter: Path, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(adapter, GGUF export folder, the same adapter fused to float weights as a folder)."""
    from lora_app.adapters.gguf import setup

    setup(log=lambda _m: None)
    tmp = tmp_path_factory.mktemp("gguf")
    out = export_adapter(dates_adapter, "gguf", tmp / "smol-dates")
    fused = export_adapter(dates_adapter, "mlx", tmp / "fused", dequantize=True)
    return dates_adapter, out, fused


@pytest.mark.slow
def test_gguf_tensors_equal_the_fused_weights(exported: tuple[Path, Path, Path]) -> None:
    import mlx.core as mx
    from gguf import GGUFReader

    _, out, fused = exported
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "check.json", "smol-dates.gguf"]
    reader = GGUFReader(str(out / "smol-dates.gguf"))
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(fused / "model.safetensors")).items()}
    names = {t.name: hf_name(t.name) for t in reader.tensors}
    assert sorted(names.values()) == sorted(weights)  # every fused tensor, nothing else (tied output)
    assert {t.tensor_type.name for t in reader.tensors} == {"F16", "F32"}
    for t in reader.tensors:
        want = weights[names[t.name]]
        if t.name.startswith("blk.") and t.name.split(".")[2] in ("attn_q", "attn_k"):
            want = _llama_cpp_permute(want, 9 if "attn_q" in t.name else 3)
        got = np.asarray(t.data, dtype=np.float32)
        assert got.shape == want.shape, t.name
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=t.name)
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.model",
                                                        "tokenizer.chat_template")}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert "<|im_start|>" in fields["tokenizer.chat_template"]


@pytest.mark.slow
def test_gguf_export_check_and_modelfile(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from lora_app.adapters.gguf import compare_tensors

    _, out, fused = exported
    check = read_check(out)
    assert check["ok"] and check["fuse"]["ok"] and check["fuse"]["weights"] == "float16"
    assert check["gguf"]["ok"] and check["gguf"]["tensors"] == 272 and check["gguf"]["architecture"] == "llama"
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./smol-dates.gguf\n# Chat template: ChatML")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert check["modelfile"]["ollama"] == f"ollama create smol-dates -f {out.resolve() / 'Modelfile'}"

    # One value changed in the file: the check names the tensor.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes((out / "smol-dates.gguf").read_bytes())
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(broken), "r+").tensors if t.name == "blk.29.attn_k.weight")
    tensor.data[3, 7] += np.float16(0.5)
    tensor.data.flush() if hasattr(tensor.data, "flush") else None
    result = compare_tensors(broken, fused)
    assert not result["ok"] and result["problems"][0].startswith("blk.29.attn_k.weight: differs from")
    assert json.dumps(result)  # what check.json holds


DEMO_PROMPT = "Write 17 March 2023 as YYYY-MM-DD."


def greedy(model_dir: Path, adapter: Path | None = None, prompt: str = DEMO_PROMPT) -> str:
    from lora_app.generate import greedy_answer, load_for_generation

    model, tokenizer = load_for_generation(str(model_dir), str(adapter) if adapter else None, dequantize=False)
    return greedy_answer(model, tokenizer, prompt, max_tokens=24)


@pytest.mark.slow
def test_4bit_mlx_export_answers_as_the_adapter(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The 4-bit base stays 4-bit (group 32; only the adapted layers are re-quantized), and the fused model gives
    the adapter's greedy answer to the demo prompt, which differs from the base model's. Not to every prompt: the
    re-quantization flips near ties ("Write 5 January 1999 ..." gives 1999-01-01, the adapter 1999-01-05), and
    the check says so (greedy agreement under 95%)."""
    from mlx_lm import load as mlx_load

    from lora_app.models import quantization_of

    adapter = exported[0]
    out = export_adapter(adapter, "mlx", tmp_path / "q4", quantize=4)
    assert quantization_of(mlx_load(str(out))[0]) == {"bits": 4, "group_size": 32}
    ours = greedy(demo.demo_model_dir(), adapter)
    assert ours == "2023-03-11" and greedy(demo.demo_model_dir()) != ours
    assert greedy(out) == ours
    fuse = read_check(out)["fuse"]
    assert fuse["weights"] == "4-bit" and fuse["max_rel_diff"] < fuse["tolerance_rel"]
    assert fuse["diff_vs_effect"] < fuse["effect_share"]
    assert fuse["argmax_agreement"] < 0.95 and not fuse["ok"]  # what it measured: 91%


def llama_cpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("llama-cpp-python is not installed (building it takes ~10 min on 2 cores, so CI does not); "
                "bench/README.md says how to run this test and holds its last output")
    return None


@pytest.mark.slow
@pytest.mark.skipif(llama_cpp_missing() is not None, reason=llama_cpp_missing() or "")
def test_llama_cpp_loads_the_gguf_and_answers_as_we_do(exported: tuple[Path, Path, Path]) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from lora_app.generate import prompt_tokens

    adapter, out, fused = exported
    llm = Llama(model_path=str(out / "smol-dates.gguf"), n_ctx=512, verbose=False, seed=0)
    hf = AutoTokenizer.from_pretrained(str(fused))
    for text in ("The capital of France is Paris.", "  spaces,\ttabs\nand 17 März 2023 — ünïcödé 😀",
                 "<|im_start|>user\nhi<|im_end|>\n", DEMO_PROMPT):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text), text
    ours = greedy(demo.demo_model_dir(), adapter)
    ids = prompt_tokens(hf, DEMO_PROMPT)  # the chat template, as our greedy answer gets it
    theirs = llm.create_completion(ids, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
    print(f"llama.cpp: {theirs.strip()!r}\nmlx-lm (base + adapter): {ours!r}")
    assert theirs.strip() == ours
