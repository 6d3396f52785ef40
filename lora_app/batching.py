"""Batches with few distinct shapes, so the compiled training step is traced once per shape, not per batch.

mlx-lm pads each batch to a multiple of 32, so data with lengths 10-1000 yields ~30 shapes and as many
re-compilations. Here a batch is either
- padded: rows of similar length (sorted, like mlx-lm) padded up to one of a few bucket lengths, or
- packed: several whole sequences share one row of a fixed length; an attention mask keeps them apart.

The order is a pure function of (seed, epoch), so a run resumed at step k sees exactly the batches it would
have seen: the position in the data is the step number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Example = tuple[list[int], list[int]]


def bucket_lengths(max_seq_length: int) -> list[int]:
    """32, 48, 64, 96, 128, 192, ... (two per octave: at most 1/3 padding) up to max_seq_length."""
    sizes, k = [], 32
    while k < max_seq_length:
        sizes += [k, k * 3 // 2]
        k *= 2
    return sorted({min(s, max_seq_length) for s in sizes} | {max_seq_length})


def bucket_for(length: int, buckets: list[int]) -> int:
    return next((b for b in buckets if b >= length), buckets[-1])


@dataclass
class Batch:
    tokens: np.ndarray  # [rows, T + 1] int32; the model sees tokens[:, :-1] and predicts tokens[:, 1:]
    weights: np.ndarray  # [rows, T] float32, 1 where the target token carries loss
    segments: np.ndarray | None = None  # [rows, T] int32 sequence ids for packed rows, else None
    # With segments: each row's sequences as (start, end) positions of the model's input (span_attention.py)
    spans: tuple[tuple[tuple[int, int], ...], ...] = ()

    @property
    def trained_tokens(self) -> int:
        return int(self.weights.sum())


class BatchPlan:
    """The batches of every epoch, as lists of example indices (padded) or rows of indices (packed)."""

    def __init__(self, examples: list[Example], batch_size: int, max_seq_length: int, mode: str = "padded",
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        if len(examples) < batch_size:
            raise ValueError(f"the dataset has {len(examples)} examples, fewer than the batch size {batch_size}")
        self.examples, self.mode, self.seed = examples, mode, seed
        self.batch_size, self.max_len = batch_size, max_seq_length
        self.rank, self.world_size = rank, world_size
        self.buckets = bucket_lengths(max_seq_length)
        self.lengths = [min(len(t), max_seq_length + 1) for t, _ in examples]
        self._epoch_cache: tuple[int, list] | None = None

    def batches_of_epoch(self, epoch: int) -> list[list]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches = self._packed(rng) if self.mode == "packed" else self._padded(rng)
        self._epoch_cache = (epoch, batches)
        return batches

    def _padded(self, rng: np.random.Generator) -> list[list]:
        # Neighbours in length share a batch (little padding); the order of the batches is shuffled.
        order = sorted(range(len(self.examples)), key=lambda i: (self.lengths[i], i))
        n = self.batch_size
        groups = [order[i:i + n] for i in range(0, len(order) - n + 1, n)]
        return [groups[i] for i in rng.permutation(len(groups))]

    def _packed(self, rng: np.random.Generator) -> list[list]:
        # Shuffle, then first-fit each sequence into rows of row_len + 1 tokens; batch_size rows per step.
        row_cap = self.row_length() + 1
        rows: list[list[int]] = []
        room: list[int] = []
        for i in rng.permutation(len(self.examples)).tolist():
            need = self.lengths[i]
            slot = next((r for r, free in enumerate(room[-64:], start=max(len(room) - 64, 0)) if free >= need),
                        None)
            if slot is None:
                rows.append([i])
                room.append(row_cap - need)
            else:
                rows[slot].append(i)
                room[slot] -= need
        n = self.batch_size
        return [rows[i:i + n] for i in range(0, len(rows) - n + 1, n)] or [rows[:n]]

    def row_length(self) -> int:
        return bucket_for(max(self.lengths) - 1, self.buckets)

    def steps_per_epoch(self) -> int:
        return len(self.batches_of_epoch(0))

    def batch_at(self, step: int) -> Batch:
        """The batch for 0-based global step `step` (this process's share of it)."""
        per_epoch = self.steps_per_epoch()
        entry = self.batches_of_epoch(step // per_epoch)[step % per_epoch]
        mine = entry[self.rank::self.world_size]
        return self._packed_batch(mine) if self.mode == "packed" else self._padded_batch(mine)

    def _padded_batch(self, indices: list[int]) -> Batch:
        width = bucket_for(max(self.lengths[i] for i in indices) - 1, self.buckets)
        tokens = np.zeros((len(indices), width + 1), np.int32)
        weights = np.zeros((len(indices), width), np.float32)
        for r, i in enumerate(indices):
            t, w = self.examples[i]
            n = self.lengths[i]
            tokens[r, :n] = t[:n]
            weights[r, : n - 1] = w[1:n]
        return Batch(tokens, weights)

    def _packed_batch(self, rows: list[list[int]]) -> Batch:
        width = self.row_length()
        tokens = np.zeros((len(rows), width + 1), np.int32)
        weights = np.zeros((len(rows), width), np.float32)
        segments = np.full((len(rows), width + 1), -1, np.int32)
        spans: list[tuple[tuple[int, int], ...]] = []
        for r, row in enumerate(rows):
            pos, row_spans = 0, []
            for seg, i in enumerate(row):
                t, w = self.examples[i]
                n = self.lengths[i]
                tokens[r, pos:pos + n] = t[:n]
                weights[r, pos:pos + n - 1] = w[1:n]
                segments[r, pos:pos + n] = seg
                row_spans.append((pos, min(pos + n, width)))
                pos += n
            spans.append(tuple(row_spans))
        if max(len(row) for row in rows) == 1:
            # One sequence per row: plain causal attention is exact (a sequence never sees the padding after
            # it), and the model keeps its fused causal attention instead of an array mask.
            return Batch(tokens, weights)
        # Padding tail: its own segment per row, so its queries still see one key (no empty softmax rows).
        segments[segments < 0] = 1_000_000
        return Batch(tokens, weights, segments[:, :-1], tuple(spans))


def eval_batches(examples: list[Example], batch_size: int, max_seq_length: int, limit: int = -1,
                 rank: int = 0, world_size: int = 1) -> list[Batch]:
    """Validation batches: padded, in a fixed order, the whole set when limit is -1."""
    if not examples:
        return []
    plan = BatchPlan(examples, min(batch_size, len(examples)), max_seq_length, "padded", 0, rank, world_size)
    groups = plan._padded(np.random.default_rng(0))
    groups = groups if limit < 0 else groups[:limit]
    return [plan._padded_batch(g[rank::world_size]) for g in groups]
