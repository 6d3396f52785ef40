"""Cross-entropy through the LM head in chunks of tokens, each chunk's gradient taken in the forward pass.

The largest tensors of a LoRA step are the logits ([tokens, vocab]: 8 x 1024 x 151,936 in bf16 is 2.5 GB for a
Qwen2 batch) and what the plain loss's backward pass makes from them (the softmax, the gradient), each as large
again. The head is frozen, so all the loss needs from it is d loss / d hidden = weight x (softmax - onehot) @ W
per token. This computes that chunk by chunk together with the loss, and the backward pass only scales the stored
[tokens, hidden] gradient: the same matmul FLOPs as the plain loss, nothing recomputed.

On a GPU the logits stay in the model's dtype and each chunk's loss comes from MLX's fused cross-entropy kernel
(float32 accumulation), as in the plain loss (mlx.nn.losses.cross_entropy) and mlx-lm's. A float32 copy of each
chunk wrote and read twice the bytes: on an H200 (0.5B Qwen2, 8 x 512) the chunked step was then 14-15% slower
than the plain one at the same memory limit, and a bfloat16 log-sum-exp shifted the loss (git log -- bench/RESULTS.md).
MLX's CPU kernels reduce in the logits' dtype, so on the CPU the chunks are float32, as MLX's documentation
advises.

The chunks must run one after another. MLX runs a graph in any order its dependencies allow: without an edge
between chunks it made every chunk's logits before the first gradient, and on an H200 the step's peak went up,
not down (commit fc04520). `mx.depends` makes chunk k+1's hidden states wait for chunk k's loss
and gradient, so one chunk's logits exist at a time.

mlx-lm's models end in `head(model.model(x))`; `find_head` checks that on the model itself, so a model whose logits
are anything else (soft-capped, scaled) keeps the plain loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Bytes of logits per chunk: 883 tokens of a 151,936-word vocabulary in bfloat16 (441 in float32); one chunk for
# small ones.
CHUNK_BYTES = 2**28


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


def logits_dtype(hidden_dtype: Any) -> Any:
    """The dtype the chunks' logits are made in: the model's on a GPU, float32 on the CPU (see above)."""
    import mlx.core as mx

    return mx.float32 if mx.default_device().type == mx.cpu else hidden_dtype


def tokens_per_chunk(vocab: int, dtype: Any) -> int:
    return max(1, CHUNK_BYTES // (vocab * dtype.size))


def cross_entropy_sum(head: Head, hidden: Any, targets: Any, weights: Any, differentiable: bool = True) -> Any:
    """Sum over tokens of weight x cross-entropy(head(hidden), target), summed in float32. hidden [tokens, hidden],
    targets and weights [tokens]; differentiable with respect to hidden (or, for evaluation, not: then no chunk
    computes a gradient)."""
    import mlx.core as mx

    dtype = logits_dtype(hidden.dtype)
    chunk = tokens_per_chunk(head.vocab, dtype)
    starts = range(0, hidden.shape[0], chunk)

    def pieces(hidden: Any, targets: Any, weights: Any):
        """Each chunk's [loss] (and d loss / d its hidden states when differentiable); chunk k+1 waits for them."""
        done: list[Any] = []
        words = mx.arange(head.vocab)
        for start in starts:
            h, t, w = hidden[start:start + chunk], targets[start:start + chunk], weights[start:start + chunk]
            h = mx.depends(h, done) if done else h
            logits = head.apply(h).astype(dtype)
            losses = mx.fast.cross_entropy(logits, t)  # log-sum-exp - the target's logit, per token, in float32
            done = [(losses * w).sum()]
            if differentiable:
                lse = (losses + mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0])[:, None]
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
