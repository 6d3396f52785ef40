"""Preference training (issue 28): DPO and ORPO losses against TRL's own code on the same log-probabilities; pair
rows detected, previewed and refused by line; a pair's answers kept apart when packed; DPO on a tiny model lifts
the held-out reward accuracy."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from lora_app import runs
from lora_app.config import DataConfig, RunConfig
from lora_app.data import load_data, preview
from lora_app.data_sources import DataError
from lora_app.pairs import PairPlan
from lora_app.preference import pair_loss

B, T, V = 3, 7, 11


def numbers(seed: int = 0):
    """Per-token log-probabilities of B chosen then B rejected answers (TRL's batch layout), answer masks with a
    prompt of varying length, and the reference's log-probabilities."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2 * B, T + 1, V)).astype(np.float32) * 2
    labels = rng.integers(0, V, size=(2 * B, T + 1))
    mask = np.zeros((2 * B, T + 1), np.float32)
    for r in range(2 * B):
        mask[r, 1 + rng.integers(0, 3): T + 1 - rng.integers(0, 2)] = 1
    shifted = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    logps = np.take_along_axis(shifted, labels[:, 1:, None], -1)[..., 0]
    ref = logps + rng.normal(size=logps.shape).astype(np.float32) * 0.3
    return logits, labels, mask, logps, ref


def ours(kind: str, mask, logps, ref, beta: float = 0.1, lam: float = 0.1):
    # our layout: answer 2i chosen, 2i + 1 rejected; rows in TRL's order (chosen rows first)
    owners = np.array([2 * r if r < B else 2 * (r - B) + 1 for r in range(2 * B)])[:, None].repeat(T, 1)
    loss, chosen, rejected = pair_loss(kind, mx.array(logps * mask[:, 1:]), mx.array(mask[:, 1:]),
                                       mx.array(owners), None if ref is None else mx.array(ref * mask[:, 1:]),
                                       beta, lam, 2 * B)
    return loss.item(), np.array(chosen), np.array(rejected)


@pytest.mark.slow  # importing TRL (and torch) takes ~10 s
def test_dpo_loss_equals_trl(beta: float = 0.3) -> None:
    torch = pytest.importorskip("torch")
    from trl.trainer.dpo_trainer import DPOTrainer

    _, labels, mask, logps, ref = numbers()
    per_token = torch.tensor(logps * mask[:, 1:])
    ref_sums = torch.tensor((ref * mask[:, 1:]).sum(1))
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(  # the attributes DPOTrainer._compute_loss reads, for its default sigmoid loss
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    inputs = {"input_ids": torch.tensor(labels), "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
              "completion_mask": torch.tensor(mask).long(), "ref_chosen_logps": ref_sums[:B],
              "ref_rejected_logps": ref_sums[B:]}
    theirs = DPOTrainer._compute_loss(fake, lambda **_: outputs, inputs, return_outputs=False).item()
    loss, chosen, rejected = ours("dpo", mask, logps, ref, beta=beta)
    assert abs(loss - theirs) < 1e-5, (loss, theirs)
    metrics = fake._metrics["train"]
    assert abs(np.mean(chosen - rejected) - metrics["rewards/margins"][0]) < 1e-5
    assert np.mean(chosen > rejected) == metrics["rewards/accuracies"][0]


@pytest.mark.slow
def test_orpo_loss_equals_trl(lam: float = 0.25) -> None:
    torch = pytest.importorskip("torch")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits, labels, mask, logps, _ = numbers(1)
    masked = torch.tensor(np.where(mask > 0, labels, -100))
    means = ORPOTrainer.get_batch_logps(torch.tensor(logits), masked, average_log_prob=True)
    nll = torch.nn.CrossEntropyLoss()(torch.tensor(logits[:B, :-1]).reshape(-1, V), masked[:B, 1:].reshape(-1))
    fake = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(fake, means[:B], means[B:])
    theirs = (nll - losses.mean()).item()  # get_batch_loss_metrics: policy_nll_loss - losses.mean()
    loss, chosen, rejected = ours("orpo", mask, logps, None, lam=lam)
    assert abs(loss - theirs) < 1e-5, (loss, theirs)
    assert np.allclose(chosen, chosen_rewards.numpy(), atol=1e-6)
    assert np.allclose(rejected, rejected_rewards.numpy(), atol=1e-6)


# ---- data -------------------------------------------------------------------------------------------------------

def write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pair_rows_are_detected_previewed_and_refused_by_line(tiny_model, tmp_path) -> None:
    from lora_app.models import load_model

    _, tokenizer = load_model(str(tiny_model))
    chat = [{"role": "user", "content": "the cat"}]
    good = [{"prompt": "the red cat", "chosen": "cat", "rejected": "red"},
            {"chosen": chat + [{"role": "assistant", "content": "cat"}],
             "rejected": chat + [{"role": "assistant", "content": "the"}]}]
    write(tmp_path / "train.jsonl", good * 2)
    cfg = DataConfig(data=str(tmp_path / "train.jsonl"), valid_fraction=0.25)
    loaded = load_data(cfg, tokenizer)
    assert loaded.format == "preference" and len(loaded.train) == 3
    (chosen, cw), (rejected, rw) = loaded.train[0]
    assert tokenizer.decode([t for t, w in zip(chosen, cw) if w]).startswith(("cat", "red", "the"))
    rows = preview(cfg, tokenizer, n_rows=2, objective="dpo")
    assert [r.where.rsplit("· ", 1)[1] for r in rows] == ["chosen", "rejected", "chosen", "rejected"]
    sft = preview(cfg, tokenizer, n_rows=2)  # SFT trains on the chosen answers only
    assert [(r.where, r.segments) for r in sft] == [(r.where, r.segments) for r in rows[::2]]
    assert "".join(t for t, trained in rows[0].segments if trained).startswith("cat")
    assert "".join(t for t, trained in rows[1].segments if trained).startswith("red")
    bad = good + [{"prompt": "x", "chosen": "y"}, {"prompt": "", "chosen": "a", "rejected": "b"},
                  {"chosen": chat, "rejected": chat + [{"role": "assistant", "content": "x"}]}]
    write(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(data=str(tmp_path / "bad.jsonl")), tokenizer)
    text = str(e.value)
    assert "bad.jsonl: line 3: missing 'rejected'" in text
    assert "line 4: 'chosen' is text, so 'prompt' must be a non-empty string" in text
    assert "line 5: 'chosen': the last message must be the assistant's answer" in text


@pytest.mark.parametrize("objective", ["sft", "dpo", "orpo"])
def test_cli_preview_shows_pairs_as_the_objective_trains_them(objective, tiny_model, tmp_path, capfd,
                                                                monkeypatch) -> None:
    """`python -m lora_app preview --objective` (what the Data step runs): SFT previews the chosen conversations
    and counts their tokens; DPO and ORPO preview the chosen / rejected pairs and count both answers."""
    from runhelp import cli_in_process

    write(tmp_path / "train.jsonl", preference_rows(8, 1))
    args = ["preview", "--model", str(tiny_model), "--data", str(tmp_path / "train.jsonl"), "--rows", "2", "--json"]
    done = cli_in_process(args + ["--objective", objective], capfd, monkeypatch)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    sides = [row["where"].rsplit("· ", 1)[1] for row in report["rows"]]
    pairs = objective != "sft"
    assert sides == (["chosen", "rejected"] * 2 if pairs else ["chosen", "chosen"])
    trained = ["".join(text for text, on in row["segments"] if on) for row in report["rows"]]
    answers = [r["chosen"] for r in preference_rows(8, 1)[:2]]
    assert [t.strip().startswith(a) for t, a in zip(trained[::2 if pairs else 1], answers, strict=True)] == [True] * 2
    stats = report["statistics"]
    assert stats["format"] == "preference" and stats["trained_tokens"] > 0
    assert ("training on the chosen answers" in " ".join(report["notes"])) != pairs
    if not pairs:  # the same rows; DPO counts both answers of each pair
        dpo = json.loads(cli_in_process(args + ["--objective", "dpo"], capfd, monkeypatch).stdout)["statistics"]
        assert dpo["rows"] == stats["rows"] and dpo["tokens"] > stats["tokens"]
        assert dpo["trained_tokens"] > stats["trained_tokens"]


def test_packed_pairs_keep_their_answers_apart() -> None:
    """One row a pair, the answers as segments 0 and 1: the mask lets no token of one see the other, so each
    answer's log-probabilities equal those of its own padded row."""
    pairs = [(([1, 2, 3, 4], [0, 0, 1, 1]), ([1, 2, 5], [0, 0, 1])), (([1, 6, 7], [0, 1, 1]), ([1, 8], [0, 1]))]
    packed = PairPlan(pairs, 2, 16, "packed").batch_at(0)
    padded = PairPlan(pairs, 2, 16, "padded").batch_at(0)
    assert packed.tokens.shape[0] == 2 and padded.tokens.shape[0] == 4
    row = list(packed.segments[0][:7])
    assert row == [0, 0, 0, 0, 1, 1, 1]
    for batch in (packed, padded):  # each answer's weighted tokens, in the same order
        got = {a: [int(t) for t, w, o in zip(batch.tokens[:, 1:].ravel(), batch.weights.ravel(),
                                             batch.owners.ravel()) if w and o == a] for a in range(4)}
        order = PairPlan(pairs, 2, 16).batches_of_epoch(0)[0]
        expected = {2 * i + s: [t for t, w in zip(*pairs[p][s]) if w] for i, p in enumerate(order) for s in (0, 1)}
        assert got == expected


def test_attention_keeps_a_packed_pair_apart(tiny_model) -> None:
    from lora_app.models import load_model
    from lora_app.preference import token_logps

    model, _ = load_model(str(tiny_model))
    pairs = [(([1, 20, 30, 40, 50], [0, 0, 1, 1, 1]), ([1, 20, 60, 70], [0, 0, 1, 1]))] * 2
    packed = PairPlan(pairs, 2, 16, "packed").batch_at(0)
    padded = PairPlan(pairs, 2, 16, "padded").batch_at(0)
    def answer_sums(batch, segments) -> list[float]:
        values = np.array(token_logps(model, mx.array(batch.tokens), segments)).ravel()
        return [values[(batch.owners.ravel() == k) & (batch.weights.ravel() > 0)].sum() for k in range(4)]

    apart, alone = answer_sums(packed, mx.array(packed.segments)), answer_sums(padded, None)
    assert np.allclose(apart, alone, atol=1e-4), (apart, alone)
    together = answer_sums(packed, None)  # without the segments, the rejected answer sees the chosen one
    assert not np.allclose(together[1::2], alone[1::2], atol=1e-4)


# ---- training -----------------------------------------------------------------------------------------------------

def preference_rows(n: int, seed: int) -> list[dict]:
    """Answer with the sentence's noun; the rejected answer follows a wrong rule: its adjective."""
    from tiny import sentences

    return [{"prompt": s, "chosen": s.split()[2], "rejected": s.split()[1]} for s in sentences(n, seed)]


@pytest.mark.slow
def test_dpo_lifts_held_out_reward_accuracy(tiny_model, tmp_path) -> None:
    from lora_app.session import objective_for, prepare
    from lora_app.trainer import Control, train

    data = tmp_path / "data"
    data.mkdir()
    write(data / "train.jsonl", preference_rows(64, 1))
    write(data / "valid.jsonl", preference_rows(32, 7))
    cfg = RunConfig.from_flat({"model": str(tiny_model), "data": str(data), "objective": "dpo", "beta": 0.5,
                               "iters": 40, "batch_size": 8, "learning_rate": 3e-3, "steps_per_report": 10,
                               "steps_per_eval": 20, "save_every": 100, "rank": 8, "alpha": 16,
                               "modules": ["q_proj", "v_proj", "o_proj", "down_proj"], "batching": "packed"})
    run_dir = tmp_path / "run"
    reporter = runs.RunFolderReporter(run_dir)
    session = prepare(run_dir, cfg, False, reporter)
    objective = objective_for(cfg, session.head)
    before = objective.evaluate(session.model, session.val)[1]
    assert before == {"reward_margin": 0.0, "reward_accuracy": 0.5}  # the reference itself: every reward 0
    train(session, objective, reporter, Control(run_dir))
    events = runs.read_events(run_dir)
    val = [e for e in events if e["event"] == "val"]
    assert val and all("reward_accuracy" in e and "reward_margin" in e for e in val)
    assert val[-1]["reward_accuracy"] >= 0.9 and val[-1]["reward_margin"] > 0, val
    train_events = [e for e in events if e["event"] == "train"]
    assert all({"reward_margin", "reward_accuracy", "grad_norm", "learning_rate"} <= set(e) for e in train_events)
