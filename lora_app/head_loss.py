"""Cross-entropy through the LM head in chunks of tokens, each chunk's gradient taken in the forward pass.

The largest tensors of a LoRA step are the logits ([tokens, vocab]: 8 x 1024 x 151,936 in bf16 is 2.5 GB for a
Qwen2 batch) and what the plain loss's backward pass makes from them (the softmax, the gradient), each as large
again. The head is frozen, so all the loss needs from it is d loss / d hidden = weight x (softmax - onehot) @ W
per token. This computes that chunk by chunk together with the loss, and the backward pass only scales the stored
[tokens, hidden] gradient: the same matmul FLOPs as the plain loss, nothing recomputed.

The chunks must run one after another. MLX runs a graph in any order its dependencies allow: without an edge
between chunks it made every chunk's logits before the first gradient, and on an H200 the step's peak went up,
not down (bench/RESULTS.md, commit fc04520). `mx.depends` makes chunk k+1's hidden states wait for chunk k's loss
and gradient, so one chunk's logits exist at a time.

mlx-lm's models end in `head(model.model(x))`; `find_head` checks that on the model itself, so a model whose logits
are anything else (soft-capped, scaled) keeps the plain loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Logits elements per chunk: 441 tokens of a 151,936-word vocabulary (256 MB in float32); one chunk for small ones.
CHUNK_ELEMENTS = 2**26


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
    training = model.training
    model.eval()  # LoRA dropout would make the two calls differ
    try:
        probe = mx.array([[1, 2, 3]])
        logits = model(probe)
        same = mx.array_equal(logits, head(inner(probe, cache=None))).item()  # called as trainer.forward does
    except Exception:  # noqa: BLE001 - any model this check does not fit keeps the plain loss
        return None
    finally:
        model.train(training)
    return Head(head, logits.shape[-1]) if same else None


def chunk_loss(head: Head, h: Any, t: Any, w: Any) -> tuple[Any, Any, Any]:
    """One chunk's float32 logits, their log-sum-exp and the chunk's weighted cross-entropy sum."""
    import mlx.core as mx

    logits = head.apply(h).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, t[:, None], axis=-1)
    return logits, lse, ((lse - picked)[:, 0] * w).sum()


def cross_entropy_sum(head: Head, hidden: Any, targets: Any, weights: Any, differentiable: bool = True) -> Any:
    """Sum over tokens of weight x cross-entropy(head(hidden), target), in float32. hidden [tokens, hidden],
    targets and weights [tokens]; differentiable with respect to hidden (or, for evaluation, not: then no chunk
    computes a gradient)."""
    import mlx.core as mx

    chunk = max(1, CHUNK_ELEMENTS // head.vocab)
    starts = range(0, hidden.shape[0], chunk)

    def pieces(hidden: Any, targets: Any, weights: Any):
        """Each chunk's [loss] (and d loss / d its hidden states when differentiable); chunk k+1 waits for them."""
        done: list[Any] = []
        words = mx.arange(head.vocab)
        for start in starts:
            h, t, w = hidden[start:start + chunk], targets[start:start + chunk], weights[start:start + chunk]
            h = mx.depends(h, done) if done else h
            logits, lse, loss = chunk_loss(head, h, t, w)
            done = [loss]
            if differentiable:
                d_logits = (mx.exp(logits - lse) - (words == t[:, None])) * w[:, None]
                done.append(mx.vjp(head.apply, [h], [d_logits.astype(h.dtype)])[1][0])
            yield done

    if not differentiable:
        return sum(done[0] for done in pieces(hidden, targets, weights))

    @mx.custom_function
    def loss_and_grad(hidden: Any, targets: Any, weights: Any) -> tuple[Any, Any]:
        losses, grads = zip(*pieces(hidden, targets, weights))
        return sum(losses), mx.concatenate(grads)

    @loss_and_grad.vjp
    def loss_and_grad_vjp(primals: list, cotangents: list, outputs: list) -> tuple:
        hidden, targets, weights = primals
        return (outputs[1] * cotangents[0]).astype(hidden.dtype), mx.zeros_like(targets), mx.zeros_like(weights)

    return loss_and_grad(hidden, targets, weights)[0]
