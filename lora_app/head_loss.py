"""Cross-entropy through the LM head in chunks of tokens, with its gradient taken during the forward pass.

The largest tensors of a LoRA step are the logits ([tokens, vocab]: 8 x 1024 x 151936 in bf16 is 2.5 GB for a
Qwen2 batch) and their gradient, as large again. The head is frozen, so all the loss needs is d loss / d hidden =
weight · (softmax - onehot) @ W per token. Computing that chunk by chunk together with the loss frees each chunk's
logits before the next, and the backward pass only scales the stored [tokens, hidden] gradient: the same FLOPs as
the plain loss, without recomputing anything. mlx-lm's models end in `head(model.model(x))`; `find_head` checks
that on the model itself, so a model whose logits are anything else (soft-capped, scaled) keeps the plain loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Logits elements per chunk (512 MB in float32): 883 tokens of a 151,936-word vocabulary, one chunk for small ones.
CHUNK_ELEMENTS = 2**27


@dataclass
class Head:
    apply: Callable[[Any], Any]  # hidden states [..., hidden] -> logits [..., vocab]
    vocab: int


def find_head(model: Any) -> Head | None:
    """The model's LM head (lm_head, or the tied embedding used as a linear layer) if the model's logits are
    exactly that head applied to `model.model`'s output; else None."""
    import mlx.core as mx

    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
        head = inner.embed_tokens.as_linear
    if inner is None or head is None:
        return None
    try:
        probe = mx.array([[1, 2, 3]])
        logits = model(probe)
        same = mx.array_equal(logits, head(inner(probe))).item()
    except Exception:  # noqa: BLE001 - any model this check does not fit keeps the plain loss
        return None
    return Head(head, logits.shape[-1]) if same else None


def cross_entropy_sum(head: Head, hidden: Any, targets: Any, weights: Any) -> Any:
    """Sum over tokens of weight x cross-entropy(head(hidden), target), in float32.
    hidden [tokens, hidden], targets and weights [tokens]; differentiable with respect to hidden."""
    import mlx.core as mx

    chunk = max(1, CHUNK_ELEMENTS // head.vocab)

    @mx.custom_function
    def loss_and_grad(hidden: Any, targets: Any, weights: Any) -> tuple[Any, Any]:
        total, grads = mx.array(0.0), []
        for start in range(0, hidden.shape[0], chunk):
            h, t, w = hidden[start:start + chunk], targets[start:start + chunk], weights[start:start + chunk]
            logits = head.apply(h).astype(mx.float32)
            lse = mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = mx.take_along_axis(logits, t[:, None], axis=-1)
            total = total + ((lse - picked)[:, 0] * w).sum()
            d_logits = (mx.exp(logits - lse) - (mx.arange(head.vocab) == t[:, None])) * w[:, None]
            grads.append(mx.vjp(head.apply, [h], [d_logits.astype(h.dtype)])[1][0])
        return total, mx.concatenate(grads)

    @loss_and_grad.vjp
    def loss_and_grad_vjp(primals: list, cotangents: list, outputs: list) -> tuple:
        hidden, targets, weights = primals
        return (outputs[1] * cotangents[0]).astype(hidden.dtype), mx.zeros_like(targets), mx.zeros_like(weights)

    return loss_and_grad(hidden, targets, weights)[0]
