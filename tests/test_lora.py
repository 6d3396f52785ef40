"""LoRA layers with the seed's semantics, on float and quantized bases; adapter files in mlx-lm's layout."""

from __future__ import annotations

import json
import math
import time

import mlx.core as mx
import numpy as np
import pytest

from lora_app.adapters import AdapterError, adapter_config, load_adapter, save_adapter
from lora_app.config import LoraConfig
from lora_app.lora import LoraError, adapter_tensors, apply_lora, count_for, parse_layers, trainable_parameter_count
from lora_app.models import inspect_model, load_model


def logits(model, text_ids=(5, 17, 42, 99, 3, 250)):
    return model(mx.array([list(text_ids)]))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_qmodel"])
def test_step_zero_equals_base_bit_for_bit(request, fixture):
    path = request.getfixturevalue(fixture)
    model, _ = load_model(str(path), dequantize=False)
    base = np.array(logits(model))
    apply_lora(model, LoraConfig(rank=4, alpha=8, modules=["q_proj", "v_proj", "down_proj"]), seed=1)
    assert np.array_equal(np.array(logits(model)), base)


def test_init_and_trainable_parameters(tiny_model):
    model, _ = load_model(str(tiny_model))
    targets = apply_lora(model, LoraConfig(rank=8, alpha=16, layers="1-1"), seed=0)
    weights = adapter_tensors(model)
    assert list(weights) == sorted(weights)  # deterministic order
    assert set(weights) == {f"model.layers.1.self_attn.{m}.lora_{x}" for m in ("q_proj", "v_proj") for x in "ab"}
    a = np.array(weights["model.layers.1.self_attn.q_proj.lora_a"])
    assert a.shape == (64, 8)  # mlx-lm stores A transposed: [in, rank]
    assert abs(a.std() - 1 / math.sqrt(64)) < 0.03  # N(0, 1/sqrt(in))
    assert not np.array(weights["model.layers.1.self_attn.q_proj.lora_b"]).any()
    info = inspect_model(model)
    expected = count_for(info.module_shapes, targets.modules, 1, 8)
    assert trainable_parameter_count(model) == expected == 8 * (64 + 64) + 8 * (64 + 32)
    layer = model.model.layers[1].self_attn.q_proj
    assert layer.scale == 2.0  # alpha / rank


def test_qlora_keeps_base_quantized_and_frozen(tiny_qmodel):
    model, _ = load_model(str(tiny_qmodel), dequantize=False)
    assert inspect_model(model).quantization == {"bits": 4, "group_size": 32}
    apply_lora(model, LoraConfig(), seed=0)
    names = [k for k, _ in __import__("mlx.utils", fromlist=["x"]).tree_flatten(model.trainable_parameters())]
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert type(model.model.layers[0].self_attn.q_proj.linear).__name__ == "QuantizedLinear"


def test_inspect_model_lists_every_linear_module(tiny_model):
    model, _ = load_model(str(tiny_model))
    info = inspect_model(model, str(tiny_model))
    assert info.architecture == "llama" and info.num_blocks == 2
    assert info.linear_modules == sorted(["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                          "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"])
    assert info.module_shapes["self_attn.k_proj"] == [32, 64]  # 2 kv heads x 16
    assert info.total_params > 0 and info.quantization is None


@pytest.mark.parametrize("spec,blocks", [("all", [0, 1, 2, 3]), ("last:2", [2, 3]), ("1-2", [1, 2]),
                                         ("3,0", [0, 3])])
def test_layer_specs(spec, blocks):
    assert parse_layers(spec, 4) == blocks


@pytest.mark.parametrize("spec,message", [("4-5", "outside the model"), ("last:9", "has 4 blocks"),
                                          ("2-1", "empty"), ("x", "expected all")])
def test_bad_layer_specs(spec, message):
    with pytest.raises(LoraError, match=message):
        parse_layers(spec, 4)


def test_huge_layer_range_is_refused_before_it_is_built():
    # The page calls parse_layers on every keystroke: 0-20000000 once built 20 million indices (1.3 GB).
    start = time.perf_counter()
    with pytest.raises(LoraError) as info:
        parse_layers("0-20000000", 2)
    assert time.perf_counter() - start < 0.1
    assert str(info.value) == ("layers=0-20000000: block(s) [2, 3, 4, 5, 6] and 19999994 more outside the model, "
                               "which has blocks 0-1")


def test_layer_spec_length_is_capped():
    with pytest.raises(LoraError, match="layers must be at most 10000 characters"):
        parse_layers(",".join(["0"] * 6000), 2)


def test_unknown_module_lists_what_the_model_has(tiny_model):
    model, _ = load_model(str(tiny_model))
    with pytest.raises(LoraError, match="'qkv_proj' not found.*down_proj, gate_proj, k_proj"):
        apply_lora(model, LoraConfig(modules=["qkv_proj"]))


def test_adapter_round_trip_and_checks(tiny_model, tmp_path):
    model, _ = load_model(str(tiny_model))
    lora = LoraConfig(rank=4, alpha=12, layers="0", modules=["q_proj", "o_proj"])
    targets = apply_lora(model, lora, seed=3)
    for name, w in adapter_tensors(model).items():  # make B non-zero so the round trip means something
        if name.endswith("lora_b"):
            model.load_weights([(name, mx.random.normal(w.shape))], strict=False)
    config = adapter_config(lora, targets, 2, str(tiny_model))
    save_adapter(model, tmp_path / "ad", config)
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["lora_parameters"] == {"rank": 4, "scale": 3.0, "dropout": 0.0,
                                        "keys": ["model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj"]}
    fresh, _ = load_model(str(tiny_model))
    load_adapter(fresh, tmp_path / "ad")
    assert np.allclose(np.array(logits(fresh)), np.array(logits(model)), atol=1e-5)

    wrong_rank = json.loads(json.dumps(saved))
    wrong_rank["lora_parameters"]["rank"] = 8
    wrong_rank["lora_app"]["alpha"] = 24
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(wrong_rank))
    with pytest.raises(AdapterError, match=r"lora_a: adapter has shape \(64, 4\), this model and rank need \(64, 8\)"):
        load_adapter(load_model(str(tiny_model))[0], tmp_path / "ad")


def test_adapter_for_another_base_is_refused(tiny_model, tmp_path):
    import sys

    sys.path.insert(0, str(tmp_path))
    from tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "wide", hidden=96)
    model, _ = load_model(str(other))
    lora = LoraConfig()
    targets = apply_lora(model, lora, seed=0)
    save_adapter(model, tmp_path / "ad", adapter_config(lora, targets, 2, str(other)))
    with pytest.raises(AdapterError, match=f"made for {other}"):
        load_adapter(load_model(str(tiny_model))[0], tmp_path / "ad")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_lora_layer_matches_mlx_lm_and_keeps_float32_parameters(dtype):
    """Float32 and float16 activations: mlx-lm's layer exactly. Bfloat16: the low-rank path runs in bf16 (no
    float32 copies of the activations), within bf16 rounding of mlx-lm's float32 path, gradients float32."""
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear as MlxLmLoRALinear

    from lora_app.lora_layer import LoRALinear

    dt = getattr(mx, dtype)
    mx.random.seed(0)
    base = nn.Linear(64, 48)
    base.set_dtype(dt)
    ours, theirs = LoRALinear(64, 48, r=4, scale=2.0), MlxLmLoRALinear(64, 48, r=4, scale=2.0)
    for layer in (ours, theirs):
        layer.linear = base
        layer.lora_a = mx.random.normal((64, 4), key=mx.random.key(1)) * 0.2
        layer.lora_b = mx.random.normal((4, 48), key=mx.random.key(2)) * 0.2
        layer.freeze(keys=["linear"])
    x = mx.random.normal((3, 5, 64), key=mx.random.key(3)).astype(dt)

    def loss(layer):
        return nn.value_and_grad(layer, lambda m: (m(x).astype(mx.float32) ** 2).sum())(layer)

    (l_ours, g_ours), (l_theirs, g_theirs) = loss(ours), loss(theirs)
    assert ours(x).dtype == dt
    assert all(g.dtype == mx.float32 for g in (g_ours["lora_a"], g_ours["lora_b"]))
    if dtype != "bfloat16":
        assert np.array_equal(np.array(ours(x)), np.array(theirs(x)))
        assert np.array_equal(np.array(g_ours["lora_b"]), np.array(g_theirs["lora_b"]))
    else:
        f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731 (numpy has no bfloat16)
        assert not np.array_equal(f32(ours(x)), f32(theirs(x)))  # the bf16 path is really taken
        assert abs(l_ours.item() - l_theirs.item()) < 1e-2 * abs(l_theirs.item())
        for name in ("lora_a", "lora_b"):
            a, b = np.array(g_ours[name]), np.array(g_theirs[name])
            assert np.abs(a - b).max() < 2e-2 * np.abs(b).max(), name
