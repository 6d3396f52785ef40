"""One reader for every adapter folder: ours, mlx_lm.lora's and PEFT's describing the same adapter read into the
same settings; mlx-lm's num_layers 0 (and any negative) means every block, as mlx-lm itself loads it; the reader
and the page's Save step import no MLX."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_app.adapters.loader import adapter_config
from lora_app.adapters.reader import AdapterError, read_adapter
from lora_app.config import LoraConfig
from lora_app.lora import LoraTargets, parse_layers

ROOT = Path(__file__).resolve().parent.parent
BASE = "models/tiny"
MODULES = ["self_attn.q_proj", "self_attn.v_proj"]
RANK, ALPHA, HIDDEN = 4, 12.0, 64


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout by hand (8-byte header length, JSON header, raw data): no MLX, no torch."""
    header, data = {}, b""
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def lora_tensors(blocks: list[int]) -> dict[str, np.ndarray]:
    """mlx-lm's names and orientation: lora_a [in, r], lora_b [r, out]."""
    rng = np.random.default_rng(0)
    out = {}
    for b in blocks:
        for m in MODULES:
            out[f"model.layers.{b}.{m}.lora_a"] = rng.normal(size=(HIDDEN, RANK))
            out[f"model.layers.{b}.{m}.lora_b"] = rng.normal(size=(RANK, HIDDEN))
    return out


def ours_folder(folder: Path, blocks: list[int], num_blocks: int = 2) -> Path:
    folder.mkdir(parents=True)
    lora = LoraConfig(rank=RANK, alpha=ALPHA, modules=MODULES, layers=",".join(map(str, blocks)))
    config = adapter_config(lora, LoraTargets(blocks, MODULES), num_blocks, BASE)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "step": 7, "val_loss": 1.5}))
    write_safetensors(folder / "adapters.safetensors", lora_tensors(blocks))
    return folder


def mlx_lm_folder(folder: Path, blocks: list[int], num_layers: object = 2, keys: list[str] | None = MODULES) -> Path:
    """What mlx_lm.lora writes: its arguments, with num_layers and lora_parameters (scale, not alpha)."""
    folder.mkdir(parents=True)
    params = {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0}
    if keys is not None:
        params["keys"] = keys
    config = {"model": BASE, "fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params,
              "iters": 10, "batch_size": 2, "adapter_path": str(folder)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors(folder / "adapters.safetensors", lora_tensors(blocks))
    return folder


def peft_folder(folder: Path, blocks: list[int], all_blocks: bool) -> Path:
    """What PEFT's save_pretrained writes: lora_A [r, in], lora_B [out, r] under base_model.model."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": BASE, "r": RANK,
              "lora_alpha": int(ALPHA), "lora_dropout": 0.0, "target_modules": ["v_proj", "q_proj"],
              "layers_to_transform": None if all_blocks else blocks, "bias": "none", "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {f"base_model.model.{name[:-7]}.lora_{name[-1].upper()}.weight": w.T
               for name, w in lora_tensors(blocks).items()}
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    return folder


def described(folder: Path) -> tuple:
    s = read_adapter(folder)
    return (s.rank, s.alpha, s.scale, s.dropout, sorted(s.modules), parse_layers(s.layers, 2),
            parse_layers(s.lora_config(2).layers, 2), s.base_model)


@pytest.mark.parametrize("blocks", [[0, 1], [0]])
def test_three_kinds_of_folder_read_the_same(blocks: list[int], tmp_path: Path) -> None:
    last_n = blocks == [0, 1]
    folders = {
        "ours": ours_folder(tmp_path / "ours", blocks),
        # mlx-lm names non-final blocks by full module paths (as our adapter_config writes them)
        "mlx-lm": mlx_lm_folder(tmp_path / "mlx-lm", blocks, len(blocks) if last_n else 2,
                                MODULES if last_n else [f"model.layers.{b}.{m}" for b in blocks for m in MODULES]),
        "peft": peft_folder(tmp_path / "peft", blocks, all_blocks=last_n),
    }
    expected = (RANK, ALPHA, ALPHA / RANK, 0.0, MODULES, blocks, blocks, BASE)
    for kind, folder in folders.items():
        s = read_adapter(folder)
        assert s.kind == kind and s.folder == folder and s.weights.is_file()
        assert described(folder) == expected, kind
    ours = read_adapter(folders["ours"])
    assert (ours.step, ours.val_loss, ours.num_blocks) == (7, 1.5, 2)


@pytest.mark.parametrize("num_layers, layers", [(0, "all"), (-1, "all"), (-5, "all"), (None, "all"),
                                                (1, "last:1"), (2, "last:2"), (16, "last:16")])
def test_mlx_lm_num_layers_reads_as_mlx_lm_loads_it(num_layers: object, layers: str, tmp_path: Path) -> None:
    """mlx-lm adapts model.layers[-max(num_layers, 0):]: 0 and negatives are every block, N past the model too."""
    folder = mlx_lm_folder(tmp_path / "a", [0, 1], num_layers)
    if num_layers is None:
        config = json.loads((folder / "adapter_config.json").read_text())
        del config["num_layers"]
        (folder / "adapter_config.json").write_text(json.dumps(config))
    s = read_adapter(folder)
    assert s.layers == layers
    expected = [1] if num_layers == 1 else [0, 1]
    assert parse_layers(s.lora_config(num_blocks=2).layers, 2) == expected


def test_the_page_reads_num_layers_0_as_the_engine_does(tmp_path: Path) -> None:
    from lora_app.ui.save_step import adapter_markdown, settings_from_adapter

    folder = mlx_lm_folder(tmp_path / "a", [0, 1], 0, keys=None)
    rank, alpha, dropout, modules, layers, model, init = settings_from_adapter(str(folder), {"linear_modules": MODULES})
    assert (rank, alpha, layers, model, init) == (RANK, ALPHA, "all", BASE, str(folder))
    assert "all blocks" in adapter_markdown(str(folder)) and "mlx_lm.lora adapter" in adapter_markdown(str(folder))


def test_engine_and_mlx_lm_load_num_layers_0_on_every_block(tiny_model: Path, tmp_path: Path) -> None:
    from mlx_lm.tuner.utils import load_adapters

    from lora_app.adapters import load_adapter, save_adapter
    from lora_app.lora import adapter_tensors, apply_lora
    from lora_app.models import load_model

    model, _ = load_model(str(tiny_model))
    lora = LoraConfig(rank=RANK, alpha=ALPHA, modules=MODULES)
    targets = apply_lora(model, lora, seed=0)
    folder = save_adapter(model, tmp_path / "a", adapter_config(lora, targets, 2, str(tiny_model)))
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_app"]
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 0}))
    ours, _ = load_model(str(tiny_model))
    assert load_adapter(ours, folder)[1].blocks == [0, 1]
    theirs, _ = load_model(str(tiny_model))
    load_adapters(theirs, str(folder))  # raises if block 0's tensors had no LoRA layer to go to
    assert set(adapter_tensors(theirs)) == set(adapter_tensors(ours)) == set(adapter_tensors(model))


def test_broken_folders_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="adapter folder not found"):
        read_adapter(tmp_path / "nowhere")
    torn = peft_folder(tmp_path / "torn", [0, 1], all_blocks=True)
    weights = torn / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterError, match="adapter_model.safetensors: cannot be read"):
        read_adapter(torn)
    wrong = peft_folder(tmp_path / "wrong-r", [0, 1], all_blocks=True)
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(AdapterError, match="r=8 but the tensors have rank 4"):
        read_adapter(wrong)
    huge = ours_folder(tmp_path / "huge", [0])
    config = json.loads((huge / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 10**9
    (huge / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="rank must be at most"):
        read_adapter(huge)


def test_reader_and_save_step_import_no_mlx(tmp_path: Path) -> None:
    """The page's process reads adapters (Save step) without MLX: a Metal abort there would kill the page."""
    folders = [ours_folder(tmp_path / "ours", [0]), mlx_lm_folder(tmp_path / "theirs", [0, 1]),
               peft_folder(tmp_path / "peft", [0, 1], all_blocks=True)]
    script = (
        "import sys\n"
        "from lora_app.adapters.reader import read_adapter\n"
        "import lora_app.adapters, lora_app.ui.save_step\n"
        f"for folder in {[str(f) for f in folders]!r}:\n"
        "    lora_app.ui.save_step.adapter_markdown(folder), read_adapter(folder).lora_config()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
