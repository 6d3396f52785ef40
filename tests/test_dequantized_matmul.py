"""dequantized_matmul.py: on CUDA a training step multiplies the blocks' frozen quantized weights as a dequantized
bfloat16 GEMM (MLX's quantized matmul is slower at training shapes). Checked here on the CPU, where it is not
installed by itself: the same loss and gradients as the quantized matmul, inside the compiled training step, for
many tokens only, and the LM head left alone."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lora_app import dequantized_matmul
from lora_app.config import LoraConfig
from lora_app.lora import apply_lora
from lora_app.models import load_model
from lora_app.objective import CrossEntropy
from lora_app.trainer import training_step


def qlora_model(path):
    model, _ = load_model(str(path), dequantize=False)
    apply_lora(model, LoraConfig(rank=4, modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    return model


def step_results(model, tokens):
    """Loss and LoRA parameters after one compiled AdamW step."""
    import mlx.optimizers as optim

    opt = optim.AdamW(learning_rate=1e-2)
    opt.init(model.trainable_parameters())
    step, state = training_step(model, opt, CrossEntropy(None))
    model.train()
    loss, _, _ = step(tokens, mx.ones((tokens.shape[0], tokens.shape[1] - 1)))
    mx.eval(loss, state)
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_a_step_equals_the_quantized_matmuls(tiny_qmodel) -> None:
    tokens = mx.random.randint(3, 300, (2, 700), key=mx.random.key(0))  # 1,398 input tokens: above MIN_TOKENS
    plain_loss, plain = step_results(qlora_model(tiny_qmodel), tokens)
    model = qlora_model(tiny_qmodel)
    assert dequantized_matmul.install(model) == 7 * len(model.layers)
    loss, params = step_results(model, tokens)
    assert loss == pytest.approx(plain_loss, rel=1e-4)
    for name, value in plain.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-3, atol=1e-5, err_msg=name)
    assert any(not np.allclose(v, 0) for k, v in params.items() if "lora_b" in k)  # the step did update B


def test_only_many_tokens_take_the_dequantized_path_and_the_head_stays(tiny_qmodel, monkeypatch) -> None:
    model = qlora_model(tiny_qmodel)
    dequantized_matmul.install(model)
    assert type(model.lm_head) is nn.QuantizedLinear
    calls = []
    real = dequantized_matmul.matmul_for
    monkeypatch.setattr(dequantized_matmul, "matmul_for", lambda *a: (calls.append(a), real(*a))[1])
    mx.eval(model(mx.zeros((1, 16), mx.int32)))
    assert calls == []  # a short prompt or a decoded token keeps the quantized matmul
    mx.eval(model(mx.zeros((2, dequantized_matmul.MIN_TOKENS), mx.int32)))
    assert len(calls) == 7 * len(model.layers)


def test_a_step_holds_one_dequantized_weight_at_a_time(monkeypatch) -> None:
    """Eight 2048 x 2048 frozen weights, the compiled gradient run as the trainer runs step 1 (MLX's memory limit
    at the memory in use, so the peak is what the graph keeps alive, not what the host allocated ahead): about one
    dequantized weight is held at a time, not all eight from the forward pass to the backward one."""
    monkeypatch.setattr(dequantized_matmul, "MIN_TOKENS", 16)
    layers = [nn.QuantizedLinear(2048, 2048, bias=False, group_size=64, bits=4) for _ in range(8)]
    for layer in layers:
        layer.__class__ = dequantized_matmul.DequantizedLinear
    x = mx.random.normal((1, 64, 2048))
    mx.eval([layer.parameters() for layer in layers], x)

    def loss(x):
        for layer in layers:
            x = layer(x)
        return (x * x).mean()

    grad = mx.compile(mx.grad(loss))
    mx.eval(grad(x))  # compiled once, then measured
    before = mx.get_active_memory()
    limit = mx.set_memory_limit(before)
    try:
        mx.reset_peak_memory()
        mx.eval(grad(x))
    finally:
        mx.set_memory_limit(limit)
    dequantized_weight = 2048 * 2048 * 4  # float32
    assert mx.get_peak_memory() - before < 3 * dequantized_weight
