"""Datasets past the parsers' limits (JSON nested 100,000 deep, a CSV field of megabytes) are bad rows with one clear
line each, which skip_bad_rows skips; and the Data step's preview of a big dataset runs outside the page's process."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
from test_data import build_tokenizer

from lora_app import data as data_mod
from lora_app.config import DataConfig
from lora_app.data import DataError, load_data
from lora_app.data_sources import MAX_FIELD_CHARS, MAX_NESTING

DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit: json.loads raises RecursionError
PARSEABLE_DEEP = {"text": "hello there", "meta": json.loads("[" * 500 + "]" * 500)}  # parses, but > MAX_NESTING
GOOD = [{"text": f"The quick brown fox {i}."} for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def lines(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def problems(path: Path, tok) -> list[str]:
    with pytest.raises(DataError) as info:
        load_data(DataConfig(data=str(path)), tok)
    return info.value.problems


@pytest.mark.parametrize("bad", [DEEP, json.dumps(PARSEABLE_DEEP)], ids=["unparseable", "parseable"])
def test_deeply_nested_jsonl_line_is_one_bad_row(tmp_path, tok, bad) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(lines(GOOD[:2] + [bad] + GOOD[2:]))
    assert problems(tmp_path, tok) == [f"{path}: line 3: nested too deeply (more than {MAX_NESTING} levels "
                                       "of lists/objects)"]
    loaded = load_data(DataConfig(data=str(tmp_path), skip_bad_rows=True), tok)
    assert loaded.skipped == 1 and len(loaded.train) + len(loaded.valid) == len(GOOD)


def test_nesting_within_the_limit_is_fine(tmp_path, tok) -> None:
    row = {"text": "hello there", "meta": json.loads("[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1))}
    (tmp_path / "train.jsonl").write_text(lines(GOOD + [row]))
    loaded = load_data(DataConfig(data=str(tmp_path)), tok)
    assert len(loaded.train) + len(loaded.valid) == len(GOOD) + 1


def test_deeply_nested_json_file_is_one_line(tmp_path, tok) -> None:
    path = tmp_path / "train.json"
    path.write_text(DEEP)
    for skip in (False, True):  # a whole document: nothing to skip
        with pytest.raises(DataError) as info:
            load_data(DataConfig(data=str(tmp_path), skip_bad_rows=skip), tok)
        assert str(info.value) == f"{path}: cannot be read: nested too deeply (more than {MAX_NESTING} levels " \
                                  "of lists/objects)"


def test_deeply_nested_item_of_a_json_list_is_one_bad_row(tmp_path, tok) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(GOOD[:3] + [PARSEABLE_DEEP] + GOOD[3:]))
    assert problems(tmp_path, tok) == [f"{path}: row 4: nested too deeply (more than {MAX_NESTING} levels "
                                       "of lists/objects)"]
    assert load_data(DataConfig(data=str(tmp_path), skip_bad_rows=True), tok).skipped == 1


def write_csv(path: Path, texts: list[str]) -> Path:
    path.write_text("text,id\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_csv_with_a_long_document_loads(tmp_path, tok) -> None:
    long = "the cat sat on the mat. " * 9000  # 216 KB, past the csv module's default 128 KB field limit
    write_csv(tmp_path / "train.csv", ["short one", long, "short two", "short three"])
    rows = data_mod.read_source(DataConfig(data=str(tmp_path))).by_file()[str(tmp_path / "train.csv")]
    assert [r.data["text"] for r in rows][1] == long and not any(r.problem for r in rows)
    loaded = load_data(DataConfig(data=str(tmp_path)), tok)
    assert max(len(t) for t, _ in loaded.train + loaded.valid) > 9000


def test_csv_field_over_the_limit_is_one_bad_row_and_reading_goes_on(tmp_path, tok) -> None:
    # quoted, over several lines, with a doubled quote: the rest of the record must not turn into rows
    huge = ("x" * 1000 + '\n""quoted"", more\n') * (MAX_FIELD_CHARS // 1000)
    path = write_csv(tmp_path / "train.csv", ["first row", "second row", huge, "fourth row", "fifth row"])
    assert problems(tmp_path, tok) == [f"{path}: line 4: a field is longer than {MAX_FIELD_CHARS:,} characters; "
                                       "split the text into several rows or use .jsonl"]
    source = data_mod.read_source(DataConfig(data=str(tmp_path)))
    rows = source.by_file()[str(path)]
    huge_lines = huge.count("\n")
    assert [(r.number, r.data and r.data["text"]) for r in rows] == [
        (2, "first row"), (3, "second row"), (4, None), (5 + huge_lines, "fourth row"), (6 + huge_lines, "fifth row")]
    loaded = load_data(DataConfig(data=str(tmp_path), skip_bad_rows=True), tok)
    assert loaded.skipped == 1 and len(loaded.train) + len(loaded.valid) == 4


def test_a_header_field_over_the_limit_is_one_line(tmp_path, tok) -> None:
    path = tmp_path / "train.csv"
    path.write_text("x" * (MAX_FIELD_CHARS + 1) + "\nhello\n")
    with pytest.raises(DataError, match=r"train.csv: line 1 \(the header\): a field is longer than"):
        load_data(DataConfig(data=str(tmp_path), skip_bad_rows=True), tok)


def test_a_bad_role_of_any_size_is_reported_short(tmp_path, tok) -> None:
    row = {"messages": [{"role": "u" * 1_000_000, "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "train.jsonl").write_text(lines([row] * 3))
    assert all(len(p) < 400 for p in problems(tmp_path, tok))


# ---------------------------------------------------------------------------------------------- the Data step


@pytest.mark.slow
def test_preview_of_a_big_dataset_stays_out_of_the_page_process(tmp_path, tiny_model, monkeypatch) -> None:
    from lora_app.ui import data_step

    path = tmp_path / "big.jsonl"
    path.write_text(lines([{"prompt": f"What is {i} plus one?", "completion": f"It is {i + 1}."}
                           for i in range(50_000)]))
    tokenized = []
    monkeypatch.setattr(data_mod, "tokenize_row", lambda *a: tokenized.append(1) or ([1, 2], [0, 1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows, stats, prompts = data_step.preview_data(str(tiny_model), str(path), "auto", 0.1, True, False, 2048, 4, "")
    assert not tokenized, "the page's process tokenized rows"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB on Linux: under 100 MB
    assert "| Rows | 45,000 train · 5,000 valid · 0 test |" in stats
    assert f"the first {data_mod.SAMPLE_ROWS:,} of 45,000 train rows" in stats
    assert f"{path}: line 1 ·" in rows and "tok-train" in rows and "tok-mask" in rows
    assert prompts.splitlines()[0].startswith("What is ")


@pytest.mark.parametrize("seq, batch, expected", [
    (float("inf"), 4, "max_seq_length must be a number from 1"), (float("nan"), 4, "max_seq_length must be"),
    (2048, 1e30, "batch_size must be a number from 1"), (2048.5, 4, "max_seq_length must be a whole number"),
])
def test_preview_bounds_the_numbers_from_the_page(tmp_path, seq, batch, expected) -> None:
    from lora_app.ui import data_step

    (tmp_path / "train.jsonl").write_text(lines(GOOD))
    rows, stats, _ = data_step.preview_data("demo", str(tmp_path), "auto", 0.1, False, False, seq, batch, "")
    assert rows == "" and stats.startswith("⚠️") and expected in stats
