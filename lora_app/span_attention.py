"""Attention over each sequence's own tokens only, for training on the CPU.

MLX's CPU backend has no fused attention: it makes every query-key score and its exponential, one scalar `exp`
at a time (about 24 ns each on the 2-core x86 machine, ten times a multiply), and in a training step of a small
model most of the time goes there. A packed row of 1,024 tokens holding sequences of 446, 57 and 281 tokens needs
the scores inside each sequence, below the diagonal: about a seventh of the 1,024² the masked attention makes.

So on the CPU a packed batch carries its sequences' spans (batching.Batch.spans), and attention runs per sequence,
in chunks of CHUNK queries, each against the keys up to its own end (MLX's "causal" mask aligns a shorter query
block to the end of its keys). The positions after a row's last sequence (padding) get zeros: they carry no loss
and no real token attends to them. The result equals the masked attention's (tests/test_span_attention.py).

The spans are Python numbers, so each batch's graph has its own shape: such a step is not compiled
(trainer.training_step). On the tiny llama of bench/compare_cli.py a packed [4, 1024] step took 3.3 s this way
against 6.4 s compiled with the mask. Batches of one sequence a row keep the compiled step and MLX's causal
attention: on rows of equal length, compiling gained more (bench/README.md). On a GPU, fused attention makes only
the scores it needs and the compiled step keeps its array mask.

mlx-lm's model files call `scaled_dot_product_attention` imported from mlx_lm.models.base; `install` replaces that
name in the module of the model's blocks with `attention`, which hands every call without spans to the original.
"""

from __future__ import annotations

import sys
from typing import Any

CHUNK = 64  # queries a block: smaller blocks skip more of the masked triangle, at more operations per step


class Spans:
    """Stands in for a KV cache so an mlx-lm model attends within `rows[r]`'s (start, end) spans: offset 0, no
    caching, and no mask array (create_attention_mask asks make_mask)."""

    offset = 0

    def __init__(self, rows: tuple[tuple[tuple[int, int], ...], ...]):
        self.rows = rows

    def make_mask(self, *args: Any, **kwargs: Any) -> str:
        return "causal"

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values


def enabled_for(model: Any) -> bool:
    """Whether this run's steps attend by spans: on the CPU, for models whose attention `install` can reach."""
    import mlx.core as mx

    return mx.default_device().type == mx.cpu and install(model)


def install(model: Any) -> bool:
    """Route the model's attention through `attention`; False when its blocks' module does not call mlx-lm's
    scaled_dot_product_attention by that name (the model then keeps the masked path)."""
    from mlx_lm.models import base

    module = sys.modules.get(type(model.layers[0]).__module__)
    current = getattr(module, "scaled_dot_product_attention", None)
    if current is attention:
        return True
    if current is not base.scaled_dot_product_attention:
        return False
    module.scaled_dot_product_attention = attention
    return True


def attention(queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any, sinks: Any = None) -> Any:
    from mlx_lm.models import base

    if not isinstance(cache, Spans):
        return base.scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    import mlx.core as mx

    width = queries.shape[2]
    rows = []
    for r, spans in enumerate(cache.rows):
        q, k, v = queries[r:r + 1], keys[r:r + 1], values[r:r + 1]
        parts = [causal(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale) for a, b in spans]
        end = spans[-1][1] if spans else 0
        if end < width:
            parts.append(mx.zeros((1, q.shape[1], width - end, q.shape[3]), q.dtype))
        rows.append(mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0])
    return mx.concatenate(rows, axis=0)


def causal(q: Any, k: Any, v: Any, scale: float) -> Any:
    """Causal attention of one sequence: each block of CHUNK queries against the keys up to its end."""
    import mlx.core as mx

    n = q.shape[2]
    blocks = [mx.fast.scaled_dot_product_attention(q[:, :, a:a + CHUNK], k[:, :, :a + CHUNK], v[:, :, :a + CHUNK],
                                                   scale=scale, mask="causal")
              for a in range(0, n, CHUNK)]
    return mx.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]
