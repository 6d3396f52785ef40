"""Preference pairs: rows with a chosen and a rejected answer, checked, tokenized and batched for DPO and ORPO.

Rows come in two forms, detected, checked and tokenized like the other formats (data.py, format `preference`):
- `{"prompt": str, "chosen": str, "rejected": str}`: the prompt as the user's turn (plain text without a chat
  template), each answer as the assistant's;
- the chat form `{"chosen": [messages], "rejected": [messages]}`, each a whole conversation ending in the assistant
  turn that is judged (TRL's implicit prompt), or `{"prompt": [messages], "chosen": [messages], "rejected": [...]}`.

A pair is two examples (tokens, weights) whose weights mark the judged answer only. Both answers of a pair are in
the same batch: padded, as rows 2i (chosen) and 2i+1 (rejected); packed, as two segments of one row, which the
attention mask (objective.forward's segment ids) keeps apart, so neither answer sees the other. `owners` gives each
token the answer it belongs to (2i or 2i+1), which the objective sums the log-probabilities by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batching import Batch, bucket_for, bucket_lengths

Example = tuple[list[int], list[int]]
Pair = tuple[Example, Example]


# ---- batches --------------------------------------------------------------------------------------------------

@dataclass
class PairBatch(Batch):
    owners: np.ndarray | None = None  # [rows, T] int32: the answer each target token belongs to (2i, 2i + 1)

    @property
    def pairs(self) -> int:
        return int(self.owners.max()) // 2 + 1


class PairPlan:
    """The batches of every epoch as lists of pair indices (`batch_size` pairs a step), a pure function of
    (seed, epoch) like batching.BatchPlan; the same interface for the loop."""

    def __init__(self, pairs: list[Pair], batch_size: int, max_seq_length: int, mode: str = "packed",
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        if len(pairs) < batch_size:
            raise ValueError(f"the dataset has {len(pairs)} pairs, fewer than the batch size {batch_size}")
        self.pairs, self.batch_size, self.mode, self.seed = pairs, batch_size, mode, seed
        self.max_len, self.rank, self.world_size = max_seq_length, rank, world_size
        self.lengths = [tuple(min(len(t), max_seq_length + 1) for t, _ in pair) for pair in pairs]
        # a packed row holds both answers, each up to max_seq_length
        self.buckets = bucket_lengths(max_seq_length * (2 if mode == "packed" else 1) + 1)

    def batches_of_epoch(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)).tolist()
        n = self.batch_size
        return [order[i:i + n] for i in range(0, len(order) - n + 1, n)]

    def steps_per_epoch(self) -> int:
        return len(self.pairs) // self.batch_size

    def row_length(self) -> int:
        need = max((c + r if self.mode == "packed" else max(c, r)) for c, r in self.lengths)
        return bucket_for(need - 1, self.buckets)

    def batch_at(self, step: int) -> PairBatch:
        """The batch for 0-based global step `step` (this process's share of it)."""
        per_epoch = self.steps_per_epoch()
        entry = self.batches_of_epoch(step // per_epoch)[step % per_epoch]
        return pair_batch([self.pairs[i] for i in entry[self.rank::self.world_size]], self.max_len,
                          self.mode, self.buckets)


def pair_batch(pairs: list[Pair], max_len: int, mode: str, buckets: list[int]) -> PairBatch:
    """Padded: 2 rows a pair; packed: 1 row a pair, its answers as segments 0 and 1 (padding: its own segment)."""
    sides = [[(t[:max_len + 1], w[:max_len + 1]) for t, w in pair] for pair in pairs]
    packed = mode == "packed"
    need = max((len(c[0]) + len(r[0]) if packed else max(len(c[0]), len(r[0]))) for c, r in sides)
    width = bucket_for(need - 1, buckets)
    rows = len(pairs) * (1 if packed else 2)
    tokens = np.zeros((rows, width + 1), np.int32)
    weights = np.zeros((rows, width), np.float32)
    owners = np.zeros((rows, width + 1), np.int32)
    segments = np.full((rows, width + 1), 1_000_000, np.int32)
    for i, pair in enumerate(sides):
        pos = 0
        for side, (t, w) in enumerate(pair):
            r = i if packed else 2 * i + side
            pos = pos if packed else 0
            n = len(t)
            tokens[r, pos:pos + n] = t
            weights[r, pos:pos + n - 1] = w[1:n]
            owners[r, pos:pos + n] = 2 * i + side
            segments[r, pos:pos + n] = side
            pos += n
    return PairBatch(tokens, weights, segments[:, :-1] if packed else None, owners=owners[:, :-1])


def pair_eval_batches(pairs: list[Pair], batch_size: int, max_seq_length: int, limit: int = -1,
                      rank: int = 0, world_size: int = 1) -> list[PairBatch]:
    """Validation batches of pairs: padded, in file order, the whole set when limit is -1."""
    n = min(batch_size, len(pairs))
    if not n:
        return []
    buckets = bucket_lengths(max_seq_length)
    groups = [list(range(i, i + n)) for i in range(0, len(pairs) - n + 1, n)]
    groups = groups if limit < 0 else groups[:limit]
    return [pair_batch([pairs[i] for i in g[rank::world_size]], max_seq_length, "padded", buckets) for g in groups]
