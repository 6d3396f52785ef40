"""Task evaluation: greedy exact-match accuracy and test loss / perplexity on a chat `test.jsonl`.

Used for the demo task (`python -m lora_app eval`) and works for any chat-format test set whose last
message is the assistant's reference answer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mlx import nn

from .demo import task_answer_matches
from .generate import load_for_generation

GEN_BATCH = 16  # prompts decoded together; bigger batches barely help on 2 CPU cores
LOSS_BATCH = 8


def read_chat_rows(path: Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    """The `messages` of each row of a chat jsonl file (first `limit` rows)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line)["messages"])
    return rows[:limit] if limit is not None else rows


def _prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True))


def generate_answers(model: nn.Module, tokenizer: Any, rows: list[list[dict[str, str]]], max_tokens: int) -> list[str]:
    """Greedy answers to each row's prompt (all messages but the last), decoded in batches."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    prompts = [_prompt_tokens(tokenizer, messages) for messages in rows]
    answers: list[str] = []
    for i in range(0, len(prompts), GEN_BATCH):
        response = batch_generate(
            model, tokenizer, prompts[i : i + GEN_BATCH], max_tokens=max_tokens, sampler=make_sampler(temp=0.0)
        )
        answers.extend(response.texts)
    return answers


def test_loss(model: nn.Module, tokenizer: Any, rows: list[list[dict[str, str]]]) -> float:
    """Mean cross-entropy over the assistant tokens: the masking and batching the trainer validates with."""
    from .batching import eval_batches
    from .data import tokenize_chat
    from .head_loss import find_head
    from .objective import evaluate

    examples = [tokenize_chat(messages, tokenizer, mask_prompt=True) for messages in rows]
    return evaluate(model, eval_batches(examples, LOSS_BATCH, max(len(t) for t, _ in examples)), find_head(model))


def evaluate_task(
    model_path: str,
    adapter_path: str | None,
    data_dir: Path,
    limit: int | None = None,
    max_tokens: int = 32,
    dequantize: bool | None = None,
) -> dict[str, Any]:
    """Greedy exact-match accuracy and test loss / perplexity of a model (+ adapter) on `data_dir/test.jsonl`."""
    model, tokenizer = load_for_generation(model_path, adapter_path, dequantize)
    rows = read_chat_rows(Path(data_dir) / "test.jsonl", limit)
    answers = generate_answers(model, tokenizer, rows, max_tokens)
    correct = sum(task_answer_matches(a, m[-1]["content"]) for a, m in zip(answers, rows))
    loss = test_loss(model, tokenizer, rows)
    return {
        "accuracy": correct / max(len(rows), 1),
        "correct": correct,
        "total": len(rows),
        "test_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),  # cap: a broken model should not overflow the report
        "examples": [
            {"prompt": m[-2]["content"], "reference": m[-1]["content"], "prediction": a}
            for a, m in list(zip(answers, rows))[:5]
        ],
    }


def format_report(result: dict[str, Any]) -> str:
    """A few human-readable lines about an `evaluate_task` result."""
    lines = [
        f"exact match: {result['accuracy']:.1%} ({result['correct']}/{result['total']})",
        f"test loss:   {result['test_loss']:.4f}",
        f"perplexity:  {result['perplexity']:.3f}",
    ]
    for ex in result.get("examples", []):
        mark = "ok" if task_answer_matches(ex["prediction"], ex["reference"]) else "x "
        lines.append(f"  [{mark}] {ex['prompt']!r} -> {ex['prediction'].strip()!r} (expected {ex['reference']!r})")
    return "\n".join(lines)
