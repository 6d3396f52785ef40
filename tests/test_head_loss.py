"""The chunked LM-head loss: same loss and LoRA gradients as the plain logits path, on float and quantized heads,
in one chunk or several; models whose logits are not head(hidden) keep the plain path."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import lora_app.head_loss as head_loss
from lora_app.config import LoraConfig
from lora_app.lora import apply_lora
from lora_app.models import load_model
from lora_app.objective import loss_fn


def batch(vocab: int, packed: bool) -> tuple:
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(3, vocab, (3, 17)).astype(np.int32))
    weights = mx.array((rng.random((3, 16)) > 0.3).astype(np.float32))
    segments = mx.array(np.repeat([[0, 1, 2, 3]], 3, 0).repeat(4, 1).astype(np.int32)) if packed else None
    return tokens, weights, segments


def lora_model(path, dtype=None):
    model, _ = load_model(str(path), dequantize=False)
    if dtype is not None:
        model.set_dtype(dtype)
    apply_lora(model, LoraConfig(rank=4, alpha=8, modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    for name, b in tree_flatten(model.trainable_parameters()):  # non-zero B, so A gets a gradient too
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, mx.random.normal(b.shape, key=mx.random.key(len(name))) * 0.1)]))
    return model


def loss_and_grads(model, args, head):
    (loss, ntoks), grads = nn.value_and_grad(model, lambda m, *a: loss_fn(m, *a, head=head))(model, *args)
    return loss.item(), ntoks.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_qmodel"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_tokens", [None, 5])  # one chunk; chunks of 5 of the 48 tokens (with a remainder)
def test_chunked_loss_matches_plain_logits(request, monkeypatch, fixture, packed, chunk_tokens):
    model = lora_model(request.getfixturevalue(fixture))
    head = head_loss.find_head(model)
    assert head is not None and head.vocab == 384
    if chunk_tokens:
        monkeypatch.setattr(head_loss, "tokens_per_chunk", lambda vocab, dtype: chunk_tokens)
    args = batch(head.vocab, packed)
    plain_loss, plain_n, plain_grads = loss_and_grads(model, args, None)
    loss, n, grads = loss_and_grads(model, args, head)
    assert n == plain_n
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys() and len(grads) == 3 * 2 * 2
    for name, g in grads.items():
        ref = np.array(plain_grads[name])
        assert np.abs(ref).max() > 0, name
        np.testing.assert_allclose(np.array(g), ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max(), err_msg=name)


@pytest.mark.parametrize("logits_in_model_dtype", [False, True])  # the CPU's float32 chunks; a GPU's bfloat16 ones
def test_bfloat16_chunks_match_the_plain_bfloat16_loss(tiny_model, monkeypatch, logits_in_model_dtype):
    """A bfloat16 model: the chunks give the plain loss's loss and gradients within bfloat16's rounding, with their
    logits in float32 (the CPU) or in bfloat16 (a GPU, where MLX's fused cross-entropy accumulates in float32);
    a chunk of CHUNK_BYTES holds twice the tokens in bfloat16."""
    qwen2_vocab = 151936
    assert [head_loss.tokens_per_chunk(qwen2_vocab, d) for d in (mx.bfloat16, mx.float32)] == [883, 441]
    assert head_loss.logits_dtype(mx.bfloat16) == mx.float32  # these tests run on the CPU
    if logits_in_model_dtype:
        monkeypatch.setattr(head_loss, "logits_dtype", lambda dtype: dtype)
    model = lora_model(tiny_model, mx.bfloat16)  # the adapters are float32, as in training
    head = head_loss.find_head(model)
    monkeypatch.setattr(head_loss, "tokens_per_chunk", lambda vocab, dtype: 5)
    args = batch(head.vocab, packed=True)
    plain_loss, _, plain_grads = loss_and_grads(model, args, None)
    loss, _, grads = loss_and_grads(model, args, head)
    assert loss == pytest.approx(plain_loss, rel=2e-3)  # they differ by <8e-4, each from float32's by about that
    for name, g in grads.items():  # within 1.6% of the largest entry; the plain loss is within 2.5% of float32's
        ref = np.array(plain_grads[name].astype(mx.float32))
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), ref, rtol=0, atol=0.03 * np.abs(ref).max(),
                                   err_msg=name)


def test_models_whose_logits_are_not_the_head_keep_the_plain_loss(tiny_model):
    model, _ = load_model(str(tiny_model))
    plain_call = type(model).__call__

    class SoftCapped(type(model)):  # like Gemma 2: logits = cap * tanh(logits / cap)
        def __call__(self, *args, **kwargs):
            return 30.0 * mx.tanh(plain_call(self, *args, **kwargs) / 30.0)

    assert head_loss.find_head(model) is not None
    model.__class__ = SoftCapped
    assert head_loss.find_head(model) is None


def test_evaluation_takes_the_chunks_without_their_gradients(tiny_model, monkeypatch):
    model = lora_model(tiny_model)
    head = head_loss.find_head(model)
    monkeypatch.setattr(head_loss, "tokens_per_chunk", lambda vocab, dtype: 5)
    args = batch(head.vocab, packed=True)
    plain, n = loss_fn(model, *args)
    chunked, chunked_n = loss_fn(model, *args, head=head, differentiable=False)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5) and chunked_n.item() == n.item()


@pytest.mark.slow
def test_the_chunks_run_one_after_another(monkeypatch):
    """Under a memory limit (MLX then lets running work finish before allocating more) the chunked loss and its
    gradient hold one chunk's logits at a time: a fraction of what the plain loss holds."""
    vocab, width, tokens = 32000, 64, 1024
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 64 * vocab * 4)  # 16 chunks of 8 MB of float32 logits
    weight = mx.random.normal((vocab, width), key=mx.random.key(0)) * 0.02
    hidden = mx.random.normal((tokens, width), key=mx.random.key(1))
    targets, weights = mx.random.randint(0, vocab, (tokens,), key=mx.random.key(2)), mx.ones((tokens,))
    head = head_loss.Head(lambda h: h @ weight.T, vocab)
    mx.eval(weight, hidden, targets, weights)

    def plain(h):
        return (nn.losses.cross_entropy(head.apply(h), targets) * weights).sum()

    def peak_above_inputs(fn) -> int:
        loss, grad = mx.value_and_grad(fn)(hidden)  # built, not yet run
        before = mx.get_active_memory()
        previous = mx.set_memory_limit(before)
        try:
            mx.reset_peak_memory()
            mx.eval(loss, grad)
        finally:
            mx.set_memory_limit(previous)
        return mx.get_peak_memory() - before

    logits_bytes = tokens * vocab * 4
    plain_peak = peak_above_inputs(plain)
    chunked_peak = peak_above_inputs(lambda h: head_loss.cross_entropy_sum(head, h, targets, weights))
    assert plain_peak > logits_bytes
    assert chunked_peak < logits_bytes / 4, (chunked_peak, plain_peak)
