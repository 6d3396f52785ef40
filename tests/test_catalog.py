"""The model catalog: sizes computed from config.json alone must agree with the models mlx-lm builds, and the
rows come in the order the Model step promises (on disk, checked on the hub, the curated list)."""

from __future__ import annotations

import shutil

import pytest
from mlx_lm.utils import _get_classes, get_total_parameters

from lora_app import catalog
from lora_app.models import inspect_path, linear_modules, linear_shape

# Fields mlx-lm's ModelArgs require that do not change a model's size (the catalog keeps only sizing fields).
NOT_SIZING = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 1e6}


@pytest.mark.parametrize("entry", catalog.curated(), ids=lambda e: e.name.split("/")[1])
def test_each_catalog_entry_is_sized_as_mlx_lm_builds_it(entry):
    """Parameters and every linear module's shape, against the model class mlx-lm picks for the config (weights
    are never materialized: MLX arrays are lazy). Biases and norms the catalog does not count stay below 0.01%."""
    config = {**NOT_SIZING, **{k: v for k, v in catalog.text_config(entry.config).items()
                               if k not in ("quantization", "text_config")}}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    total = get_total_parameters(model)
    if config.get("tie_word_embeddings") and "lm_head" in model:  # mlx-lm drops it when loading tied weights
        total -= model.lm_head.weight.size
    info = catalog.info_from_config(entry.config)
    assert abs(info["total_params"] - total) / total < 1e-4
    assert info["module_shapes"] == {name: linear_shape(m) for name, m in linear_modules(model.layers[0]).items()}


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_qmodel"])
def test_a_folder_is_sized_as_inspect_finds_it(fixture, request):
    folder = request.getfixturevalue(fixture)
    real = inspect_path(str(folder))
    info = catalog.info_from_config(catalog.read_config(folder))
    assert info["module_shapes"] == real.module_shapes
    assert info["num_blocks"] == real.num_blocks and info["hidden_size"] == real.hidden_size
    assert abs(info["total_params"] - real.total_params) / real.total_params < 0.01
    assert (info["quantization"] or {}).get("bits") == (real.quantization or {}).get("bits")


def test_rows_on_disk_first_then_checked_then_the_list_without_repeats(tiny_model, tmp_path):
    models_dir = tmp_path / "models"
    shutil.copytree(tiny_model, models_dir / "my-model")
    (models_dir / "not-a-model").mkdir()
    cached = [{"repo": "mlx-community/Qwen3-0.6B-4bit", "path": str(tiny_model), "size_bytes": 1234}]
    checked = [catalog.Entry("someone/new-model", "hub", catalog.DEMO_CONFIG, size_bytes=5 * 10**8, gated=True)]
    rows = catalog.entries(models_dir, cached, None, checked)
    names = [e.name for e in rows]
    assert names[:4] == ["demo", "mlx-community/Qwen3-0.6B-4bit", str(models_dir / "my-model"),
                         "someone/new-model"]
    assert [e.where for e in rows[:4]] == ["built in", "on disk", "on disk", "hub"]
    assert names.count("mlx-community/Qwen3-0.6B-4bit") == 1  # on disk: not listed again to download
    assert len(rows) == 4 + len(catalog.curated()) - 1
    table = catalog.table(rows, catalog.Settings(), 16 * 10**9)
    assert table[3][4:6] == ["0.50 GB", "- · gated: needs a token"]  # the hub's size, not an estimate
    assert table[4][4].startswith("≈ ")  # a curated entry's size is computed, and says so
