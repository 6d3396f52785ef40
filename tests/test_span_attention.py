"""Span attention (lora_app/span_attention.py): on the CPU a batch's sequences attend within their own spans, in
blocks, instead of through a mask over the whole row. The loss and gradients must be the masked attention's, the
work must follow the sequences' lengths rather than the rows', and a CPU run must train this way with the same
losses as the compiled masked step."""

from __future__ import annotations

import random
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lora_app import span_attention, trainer
from lora_app.batching import BatchPlan
from lora_app.config import RunConfig
from lora_app.objective import CrossEntropy, batch_arrays, loss_fn
from lora_app.runs import RunFolderReporter, read_events
from lora_app.session import prepare

MAX_LEN = 256


def examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Sequences of 5-200 tokens (several CHUNKs), the first third of each without loss (a prompt)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 200)
        out.append(([rng.randrange(3, 300) for _ in range(length)], [int(i >= length // 3) for i in range(length)]))
    return out


def long_rows(folder):
    """Text rows of 2-25 sentences (about 20-250 tokens): rows longer than a CHUNK, several to a packed row."""
    from tiny import sentences, write_jsonl

    rng = random.Random(1)
    folder.mkdir()
    for split, n in (("train", 32), ("valid", 4)):
        write_jsonl(folder / f"{split}.jsonl", [{"text": " ".join(sentences(rng.randint(2, 25), seed=rng.random()))}
                                               for _ in range(n)])
    return folder


def session(tiny_model, text_data, run_dir, **overrides):
    cfg = RunConfig.from_flat({"model": str(tiny_model), "data": str(text_data), "batch_size": 4,
                               "max_seq_length": MAX_LEN, "steps_per_eval": 0, "save_every": 10**6,
                               "modules": "q_proj,v_proj,down_proj", **overrides})
    return prepare(run_dir, cfg, False, RunFolderReporter(run_dir))


def loss_and_grads(model, arrays):
    import mlx.nn as nn

    (loss, _), grads = nn.value_and_grad(model, loss_fn)(model, *arrays)
    return loss.item(), dict(tree_flatten(grads))


def test_loss_and_gradients_equal_the_masked_attention(tiny_model, text_data, tmp_path) -> None:
    s = session(tiny_model, text_data, tmp_path)
    assert span_attention.install(s.model)
    batch = BatchPlan(examples(24), 4, MAX_LEN, "packed", seed=0).batch_at(0)
    assert batch.segments is not None and max(len(row) for row in batch.spans) >= 3
    masked_loss, masked = loss_and_grads(s.model, batch_arrays(batch))
    span_loss, spans = loss_and_grads(s.model, batch_arrays(batch, spans=True))
    assert span_loss == pytest.approx(masked_loss, rel=1e-5)
    assert masked.keys() == spans.keys()
    for name, g in masked.items():
        np.testing.assert_allclose(np.array(spans[name]), np.array(g), rtol=1e-3, atol=1e-5, err_msg=name)


def test_attention_work_follows_the_sequences_not_the_rows(tiny_model, text_data, tmp_path, monkeypatch) -> None:
    s = session(tiny_model, text_data, tmp_path)
    span_attention.install(s.model)
    batch = BatchPlan(examples(24), 4, MAX_LEN, "packed", seed=0).batch_at(0)
    scores: list[int] = []
    fused = mx.fast.scaled_dot_product_attention

    def counted(q, k, v, **kwargs):
        scores.append(q.shape[2] * k.shape[2])
        return fused(q, k, v, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", counted)
    mx.eval(loss_fn(s.model, *batch_arrays(batch, spans=True)))
    per_layer = sum(scores) / len(s.model.layers)
    lengths = [b - a for row in batch.spans for a, b in row]
    # Each sequence's lower triangle plus at most one block's width of its diagonal; the mask's whole rows are
    # rows x width^2.
    assert per_layer <= sum(n * n / 2 + n * span_attention.CHUNK for n in lengths)
    rows, width = batch.weights.shape
    assert per_layer < 0.5 * rows * width * width


def test_a_cpu_run_trains_by_spans_with_the_masked_steps_losses(tiny_model, text_data, tmp_path,
                                                                monkeypatch) -> None:
    losses, data = {}, long_rows(tmp_path / "data")
    for name, spans in (("spans", None), ("masked", False)):
        s = session(tiny_model, data, tmp_path / name, iters=6, steps_per_report=1, batching="packed")
        assert max(b - a for row in s.plan.batch_at(0).spans for a, b in row) > span_attention.CHUNK
        if spans is None:
            assert trainer.attends_by_spans(s, CrossEntropy(s.head)), "a CPU run should train by spans"
        else:
            monkeypatch.setattr(trainer, "attends_by_spans", lambda *_: False)
        s.started = time.perf_counter()
        trainer.train(s, CrossEntropy(s.head), RunFolderReporter(s.run_dir), trainer.Control(s.run_dir))
        losses[name] = [e["loss"] for e in read_events(s.run_dir) if e["event"] == "train"]
    assert len(losses["spans"]) == 6
    np.testing.assert_allclose(losses["spans"], losses["masked"], rtol=1e-4)
