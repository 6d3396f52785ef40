"""Default sample-probe prompts come from the validation rows, in every data format (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_app.config import DataConfig
from lora_app.data import DataError
from lora_app.probes import MAX_PROBES, default_probe_prompts


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_chat_prompts_are_the_last_user_turn_of_validation_rows(tmp_path):
    chat = lambda q: {"messages": [{"role": "system", "content": "Be brief."},  # noqa: E731
                                   {"role": "user", "content": "first turn"}, {"role": "assistant", "content": "ok"},
                                   {"role": "user", "content": q}, {"role": "assistant", "content": "a"}]}
    write(tmp_path / "train.jsonl", [chat("train question")] * 4)
    write(tmp_path / "valid.jsonl", [chat("valid 1"), chat("valid 1"), chat("valid\n 2"), chat("valid 3")])
    assert default_probe_prompts(DataConfig(data=str(tmp_path))) == ["valid 1", "valid 2", "valid 3"]
    assert default_probe_prompts(DataConfig(data=str(tmp_path)), n=2) == ["valid 1", "valid 2"]


def test_completions_instruction_and_text_rows(tmp_path):
    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}"} for i in range(10)]
    single = write(tmp_path / "qa.jsonl", rows)
    prompts = default_probe_prompts(DataConfig(data=str(single), valid_fraction=0.5), n=9)
    assert len(prompts) == MAX_PROBES and set(prompts) <= {f"Q{i}?" for i in range(10)}

    folder = tmp_path / "instr"
    folder.mkdir()
    write(folder / "train.jsonl", [{"instruction": "Translate", "input": "chat", "output": "cat"}])
    write(folder / "valid.jsonl", [{"instruction": "Summarise", "input": "", "output": "short"}])
    assert default_probe_prompts(DataConfig(data=str(folder))) == ["Summarise"]

    mapped = tmp_path / "mapped"
    mapped.mkdir()
    write(mapped / "train.jsonl", [{"question": "Why?", "answer": "Because."}])
    cfg = DataConfig(data=str(mapped), columns={"prompt": "question", "completion": "answer"})
    assert default_probe_prompts(cfg) == ["Why?"]  # no validation file: the train rows

    text = tmp_path / "text"
    text.mkdir()
    write(text / "train.jsonl", [{"text": "one two three four five six seven eight nine ten"}])
    assert default_probe_prompts(DataConfig(data=str(text))) == ["one two three four five six seven eight"]


def test_bad_data_is_the_data_error(tmp_path):
    write(tmp_path / "train.jsonl", [{"unknown": 1}])
    with pytest.raises(DataError, match="cannot tell the format"):
        default_probe_prompts(DataConfig(data=str(tmp_path)))
