"""What training minimises: an objective gives the loop a differentiable `loss` for each step and an `evaluate` for
validation. Supervised fine-tuning's (CrossEntropy) is the one the app trains with; another objective (preference
training, say) is another class with the same two methods, passed to trainer.train() without touching the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .batching import Batch
from .distributed import all_sum
from .head_loss import Head, cross_entropy_sum


class Objective(Protocol):
    # Names of the values the loss returns as a third output (one vector), which the train events report as
    # their means (preference training: reward margin and accuracy); () for none.
    metrics: tuple[str, ...]

    def loss(self, model: Any, *batch: Any) -> tuple[Any, ...]:
        """(mean loss, number of tokens it is over[, metrics vector]) for one batch's arrays (batch_arrays);
        differentiated."""

    def evaluate(self, model: Any, batches: list[Batch],
                 before_batch: Callable[[], None] | None = None) -> float | tuple[float, dict[str, float]]:
        """The validation loss over `batches`, over all processes (lower is better: it picks the best adapter),
        and optionally more named values for the `val` event. `before_batch()` runs before each batch: the loop's
        stop check, so Stop reaches a long evaluation."""


class CrossEntropy:
    """Mean cross-entropy over the tokens whose weight is 1 (all of them, or the completions only). With the model's
    LM head (head_loss.find_head), the step never holds the whole logits tensor or its gradient."""

    metrics: tuple[str, ...] = ()

    def __init__(self, head: Head | None = None):
        self.head = head

    def loss(self, model: Any, *batch: Any) -> tuple[Any, Any]:
        return loss_fn(model, *batch, head=self.head)

    def evaluate(self, model: Any, batches: list[Batch], before_batch: Callable[[], None] | None = None) -> float:
        return evaluate(model, batches, self.head, before_batch)


class SegmentMask:
    """Stands in for a KV cache so an mlx-lm model attends with our mask (packed rows): offset 0, no caching."""

    offset = 0

    def __init__(self, mask: Any):
        self.mask = mask

    def make_mask(self, *args: Any, **kwargs: Any) -> Any:
        return self.mask

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values


def forward(model: Any, inputs: Any, segments: Any = None, hidden_only: bool = False) -> Any:
    """Logits (or with hidden_only, the last hidden states before the LM head); a packed row's sequences (segment
    ids, or span_attention.Spans) attend only to themselves, causally."""
    import mlx.core as mx

    from .span_attention import Spans

    cache = None
    if isinstance(segments, Spans):
        cache = [segments] * len(model.layers)
    elif segments is not None:
        n = segments.shape[1]
        causal = mx.arange(n)[:, None] >= mx.arange(n)[None]
        mask = (segments[:, None, :, None] == segments[:, None, None, :]) & causal
        cache = [SegmentMask(mask)] * len(model.layers)
    return (model.model if hidden_only else model)(inputs, cache=cache)


def loss_fn(model: Any, tokens: Any, weights: Any, segments: Any = None, head: Head | None = None,
            differentiable: bool = True) -> tuple[Any, Any]:
    """Mean cross-entropy over the tokens whose weight is 1, and their count. With `head` the loss is computed in
    chunks (head_loss.py); `differentiable=False` (evaluation) skips the gradient that path computes in the forward
    pass."""
    import mlx.core as mx
    import mlx.nn as nn

    ntoks = weights.sum()
    if head is None:
        logits = forward(model, tokens[:, :-1], segments)
        ce = (nn.losses.cross_entropy(logits, tokens[:, 1:]) * weights).astype(mx.float32).sum()
    else:
        hidden = forward(model, tokens[:, :-1], segments, hidden_only=True)
        ce = cross_entropy_sum(head, hidden.reshape(-1, hidden.shape[-1]), tokens[:, 1:].reshape(-1),
                               weights.reshape(-1), differentiable)
    return ce / mx.maximum(ntoks, 1), ntoks


def batch_arrays(batch: Batch, spans: bool = False) -> tuple:
    """A batch as the arrays loss() takes: tokens, weights, for preference pairs the answer of each token
    (pairs.PairBatch.owners) and, for packed rows of several sequences, segment ids, or with `spans` their spans
    (span_attention.Spans)."""
    import mlx.core as mx

    from .span_attention import Spans

    arrays = (mx.array(batch.tokens), mx.array(batch.weights))
    owners = getattr(batch, "owners", None)
    arrays += (mx.array(owners),) if owners is not None else ()
    if batch.segments is None:
        return arrays
    return arrays + ((Spans(batch.spans),) if spans else (mx.array(batch.segments),))


def evaluate(model: Any, batches: list[Batch], head: Head | None = None,
             before_batch: Callable[[], None] | None = None) -> float:
    """Token-weighted mean loss over the batches (the same masked tokens as training), over all processes."""
    import mlx.core as mx

    total, count = mx.array(0.0), mx.array(0.0)
    for batch in batches:
        if before_batch:
            before_batch()
        loss, ntoks = loss_fn(model, *batch_arrays(batch), head=head, differentiable=False)
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    return (all_sum(total) / mx.maximum(all_sum(count), 1)).item()
