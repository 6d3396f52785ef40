"""Preference training objectives: DPO and ORPO, each an Objective (objective.py) the loop is given as it is given
cross-entropy. The losses are TRL's (tests/test_preference.py feeds both the same log-probabilities):

- DPO (sigmoid): -log σ(β · ((π_c - π_r) - (ref_c - ref_r))), with π and ref the summed log-probabilities of an
  answer's tokens under the trained model and the reference. The reference is the same model with its adapter
  switched off (lora_layer.adapters_off): no second copy of the weights. Rewards: β · (π - ref).
- ORPO: NLL of the chosen answer - λ · log σ(log odds(chosen) - log odds(rejected)), odds from the mean
  log-probability per answer token, log odds(p) = log p - log(1 - p). Rewards: λ · mean log-probability.

Each step reports the reward margin (chosen - rejected, mean over pairs) and the reward accuracy (share of pairs
whose chosen answer has the higher reward; a tie counts half, so the untrained model, whose DPO rewards are all
zero, scores 50%).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .distributed import all_sum
from .objective import forward

KINDS = ("dpo", "orpo")


def token_logps(model: Any, tokens: Any, segments: Any = None) -> Any:
    """log p(token i+1 | tokens ..i) for every position: [rows, T]."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = forward(model, tokens[:, :-1], segments)
    return -nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:])


def answer_sums(values: Any, weights: Any, owners: Any, answers: int) -> tuple[Any, Any]:
    """Per answer (owner 0..answers-1): the sum of `values` over its weighted tokens, and their count."""
    import mlx.core as mx

    onehot = (owners.reshape(-1, 1) == mx.arange(answers)).astype(mx.float32)
    w = weights.reshape(-1).astype(mx.float32)
    return (values.reshape(-1).astype(mx.float32) * w) @ onehot, w @ onehot


def dpo_loss(chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> tuple[Any, Any, Any]:
    """Mean DPO (sigmoid) loss over the pairs, and each pair's chosen and rejected rewards."""
    import mlx.core as mx
    import mlx.nn as nn

    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    losses = -nn.log_sigmoid(chosen_rewards - rejected_rewards)
    return mx.mean(losses), mx.stop_gradient(chosen_rewards), mx.stop_gradient(rejected_rewards)


def log1mexp(x: Any) -> Any:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (TRL's log1mexp)."""
    import mlx.core as mx

    return mx.where(x > -0.6931472, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def orpo_loss(chosen_mean: Any, rejected_mean: Any, nll: Any, lam: float) -> tuple[Any, Any, Any]:
    """ORPO's loss from the answers' mean log-probabilities and the chosen answers' NLL, and the rewards."""
    import mlx.core as mx
    import mlx.nn as nn

    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    loss = nll - lam * mx.mean(nn.log_sigmoid(log_odds))
    return loss, mx.stop_gradient(lam * chosen_mean), mx.stop_gradient(lam * rejected_mean)


def pair_loss(kind: str, logps: Any, weights: Any, owners: Any, ref_logps: Any, beta: float, lam: float,
              answers: int) -> tuple[Any, Any, Any]:
    """(loss, chosen rewards, rejected rewards) from per-token log-probabilities ([rows, T]; ref_logps only for
    DPO), the weights marking each answer's judged tokens and the owners naming its answer (2i chosen, 2i+1
    rejected)."""
    sums, counts = answer_sums(logps, weights, owners, answers)
    if kind == "dpo":
        ref, _ = answer_sums(ref_logps, weights, owners, answers)
        return dpo_loss(sums[0::2], sums[1::2], ref[0::2], ref[1::2], beta)
    import mlx.core as mx

    means = sums / mx.maximum(counts, 1)
    nll = -sums[0::2].sum() / mx.maximum(counts[0::2].sum(), 1)
    return orpo_loss(means[0::2], means[1::2], nll, lam)


def reward_stats(chosen_rewards: Any, rejected_rewards: Any) -> Any:
    """[mean margin, accuracy (ties count half)] over the pairs."""
    import mlx.core as mx

    margin = chosen_rewards - rejected_rewards
    accuracy = (margin > 0).astype(mx.float32) + 0.5 * (margin == 0).astype(mx.float32)
    return mx.stack([mx.mean(margin), mx.mean(accuracy)])


class Preference:
    """DPO or ORPO on PairBatch arrays (tokens, weights, owners[, segments])."""

    metrics = ("reward_margin", "reward_accuracy")

    def __init__(self, kind: str, beta: float = 0.1, lam: float = 0.1):
        if kind not in KINDS:
            raise ValueError(f"preference objective must be one of {', '.join(KINDS)} (got {kind!r})")
        self.kind, self.beta, self.lam = kind, beta, lam

    def pair_loss(self, model: Any, tokens: Any, weights: Any, owners: Any, segments: Any = None):
        import mlx.core as mx

        from .lora_layer import adapters_off

        answers = 2 * tokens.shape[0] if segments is not None else tokens.shape[0]
        logps = token_logps(model, tokens, segments)
        ref = None
        if self.kind == "dpo":
            with adapters_off():
                ref = mx.stop_gradient(token_logps(model, tokens, segments))
        return pair_loss(self.kind, logps, weights, owners, ref, self.beta, self.lam, answers)

    def loss(self, model: Any, tokens: Any, weights: Any, owners: Any, segments: Any = None) -> tuple[Any, Any, Any]:
        loss, chosen, rejected = self.pair_loss(model, tokens, weights, owners, segments)
        return loss, weights.sum(), reward_stats(chosen, rejected)

    def evaluate(self, model: Any, batches: list, before_batch: Callable[[], None] | None = None
                 ) -> tuple[float, dict[str, float]]:
        """Pair-weighted mean loss, reward margin and accuracy over the batches, over all processes."""
        import mlx.core as mx

        from .objective import batch_arrays

        total = mx.zeros((4,))  # loss · pairs, margin sum, accuracy sum, pairs
        for batch in batches:
            if before_batch:
                before_batch()
            loss, chosen, rejected = self.pair_loss(model, *batch_arrays(batch))
            n = chosen.shape[0]
            total = total + mx.concatenate([(loss * n).reshape(1), reward_stats(chosen, rejected) * n,
                                            mx.array([float(n)])])
            mx.eval(total)
        loss_sum, margin, accuracy, pairs = all_sum(total).tolist()
        pairs = max(pairs, 1)
        return loss_sum / pairs, {"reward_margin": margin / pairs, "reward_accuracy": accuracy / pairs}
