"""Tests for lora_app/data.py: sources, formats, masking, bad input, preview and statistics (offline, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_app import data, data_sources
from lora_app.config import DataConfig
from lora_app.data import DataError, LoadedData, load_data

IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# a template that, like Gemma's, refuses system messages
NO_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + CHATML)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is the capital.",
    "system user assistant tool", "Convert 16 December 1939 to ISO format: 1939-12-16",
    "Hello there, how are you today? I am fine, thank you.", "Ünïcödé: naïve café, 東京, emoji 🙂",
] * 20


def build_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                 additional_special_tokens=[IM_START, IM_END])
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def cfg(path, **kw) -> DataConfig:
    return DataConfig(data=str(path), **kw)


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


def test_tokenizer_smoke(tok):
    ids = data.chat_ids(tok, chat("hi", "there")["messages"])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nthere<|im_end|>\n"


# ---------------------------------------------------------------------------------------------- formats


def trained_text(tok, example) -> str:
    tokens, weights = example
    return tok.decode([t for t, w in zip(tokens, weights) if w])


@pytest.mark.parametrize("row, fmt, columns", [
    ({"text": "The quick brown fox."}, "text", {}),
    ({"prompt": "What is the capital?", "completion": "Paris"}, "completions", {}),
    (chat("What is the capital?", "Paris"), "chat", {}),
    ({"instruction": "Name the capital", "input": "of France", "output": "Paris"}, "instruction", {}),
    ({"question": "What is the capital?", "answer": "Paris"}, "completions", {"prompt": "question",
                                                                               "completion": "answer"}),
    ({"body": "The quick brown fox."}, "text", {"text": "body"}),
    ({"conversations": [{"from": "human", "value": "What is the capital?"}, {"from": "gpt", "value": "Paris"}]},
     "chat", {}),
])
def test_each_format_is_detected_and_masked(tmp_path, tok, row, fmt, columns):
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [row] * 3)
    write_jsonl(tmp_path / "d" / "valid.jsonl", [row])
    loaded = load_data(cfg(path.parent, columns=columns, mask_prompt=True), tok)
    assert loaded.format == fmt
    assert f"detected format: {fmt} (from the fields of {path}: line 1)" in loaded.notes
    assert (len(loaded.train), len(loaded.valid), len(loaded.test)) == (3, 1, 0)
    tokens, weights = loaded.train[0]
    assert len(tokens) == len(weights) and weights[0] == 0
    if fmt == "text":
        assert tokens[-1] == tok.eos_token_id and sum(weights) == len(tokens) - 1
    else:  # only the answer (and the end of its turn) is trained
        assert trained_text(tok, loaded.train[0]) == f"Paris{IM_END}\n"


def test_instruction_joins_instruction_and_input(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Name it", "input": "France", "output": "Paris"}] * 4)
    tokens, _ = load_data(cfg(path), tok).train[0]
    assert tok.decode(tokens).startswith(f"{IM_START}user\nName it\n\nFrance{IM_END}")


def test_format_can_be_forced_and_system_column_is_used(tmp_path, tok):
    rows = [{"prompt": "Q", "completion": "A", "text": "ignored", "system": "Be brief"}] * 2
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    loaded = load_data(cfg(path, data_format="completions"), tok)
    assert loaded.format == "completions" and "format: completions (set by data_format)" in loaded.notes
    assert tok.decode(loaded.train[0][0]).startswith(f"{IM_START}system\nBe brief{IM_END}")


def test_without_mask_every_token_but_the_first_is_trained(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [chat("hello", "there")] * 2)
    tokens, weights = load_data(cfg(path, mask_prompt=False), tok).train[0]
    assert weights == [0] + [1] * (len(tokens) - 1)


def test_completions_without_chat_template_join_plain_text(tmp_path):
    plain = build_tokenizer(chat_template=None)
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Capital of France? ", "completion": "Paris"}] * 2)
    loaded = load_data(cfg(path, mask_prompt=True), plain)
    assert any("no chat template" in n for n in loaded.notes)
    assert plain.decode(loaded.train[0][0]) == f"Capital of France? Paris{EOS}"
    assert trained_text(plain, loaded.train[0]) == f"Paris{EOS}"
    chat_path = write_jsonl(tmp_path / "c" / "train.jsonl", [chat("a", "b")] * 2)
    with pytest.raises(DataError, match="no chat template"):
        load_data(cfg(chat_path), plain)


# ---------------------------------------------------------------------------------------------- masking


def test_three_turn_chat_trains_exactly_every_assistant_turn(tmp_path, tok):
    turns = [("system", "You are brief."), ("user", "Hello there"), ("assistant", "Hello, how are you?"),
             ("user", "What is the capital of France?"), ("assistant", "Paris is the capital."),
             ("user", "Thank you"), ("assistant", "I am fine, thank you.")]
    messages = [{"role": r, "content": c} for r, c in turns]
    # expected positions, built independently: tokenize the rendered pieces and mark the assistant ones
    pieces, expected_ids, expected = [], [], set()
    for k, (role, content) in enumerate(turns):
        if role == "assistant":
            pieces += [(f"{content}{IM_END}\n", True)]
        elif k + 1 < len(turns) and turns[k + 1][0] == "assistant":
            pieces += [(f"{IM_START}{role}\n{content}{IM_END}\n{IM_START}assistant\n", False)]
        else:
            pieces += [(f"{IM_START}{role}\n{content}{IM_END}\n", False)]
    for text, trained in pieces:
        ids = tok.encode(text, add_special_tokens=False)
        if trained:
            expected |= set(range(len(expected_ids), len(expected_ids) + len(ids)))
        expected_ids += ids
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": messages}] * 2)
    tokens, weights = load_data(cfg(path, mask_prompt=True), tok).train[0]
    assert tokens == expected_ids
    assert {i for i, w in enumerate(weights) if w} == expected
    assert len(expected) > 20  # all three answers, not only the last


def test_masking_through_mlx_lm_tokenizer_wrapper(tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    messages = chat("Hello there", "Paris")["messages"] + chat("Thank you", "I am fine")["messages"]
    wrapped = TokenizerWrapper(tok)
    assert data.has_chat_template(wrapped)
    assert data.tokenize_chat(messages, wrapped, True) == data.tokenize_chat(messages, tok, True)
    tokens, weights = data.tokenize_chat(messages, wrapped, True)
    assert tok.decode([t for t, w in zip(tokens, weights) if w]) == f"Paris{IM_END}\nI am fine{IM_END}\n"


def test_chat_ids_accepts_a_batch_encoding():
    class DictTokenizer:  # what transformers 5 returns when return_dict is not honoured
        def apply_chat_template(self, messages, **kw):
            return {"input_ids": [[5, 6, 7]]}

    assert data.chat_ids(DictTokenizer(), [{"role": "user", "content": "x"}]) == [5, 6, 7]


# ---------------------------------------------------------------------------------------------- sources

QA = [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(10)]


def write_as(path: Path, rows: list[dict]) -> Path:
    """Write rows as .jsonl, .json, .csv or .parquet, by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_folder_with_train_valid_test_in_each_file_type(tmp_path, tok, ext):
    for split, rows in (("train", QA[:6]), ("valid", QA[6:8]), ("test", QA[8:])):
        write_as(tmp_path / f"{split}{ext}", rows)
    loaded = load_data(cfg(tmp_path, mask_prompt=True), tok)
    assert loaded.format == "completions"
    assert (len(loaded.train), len(loaded.valid), len(loaded.test)) == (6, 2, 2)
    assert trained_text(tok, loaded.test[1]) == f"18{IM_END}\n"


def test_single_file_is_split_deterministically(tmp_path, tok):
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "all.jsonl", rows)

    def valid_texts(seed: int, fraction: float = 0.25) -> list[str]:
        loaded = load_data(cfg(path, valid_fraction=fraction, split_seed=seed), tok)
        assert len(loaded.train) + len(loaded.valid) == 20
        assert any(f"held out {len(loaded.valid)} of 20 rows" in n for n in loaded.notes)
        return [tok.decode(t[:-1]) for t, _ in loaded.valid]

    first = valid_texts(seed=1)
    assert len(first) == 5
    assert valid_texts(seed=1) == first
    assert valid_texts(seed=2) != first
    assert len(valid_texts(seed=1, fraction=0.1)) == 2


def test_split_rows_never_empties_train():
    assert data_sources.split_rows([1], 0.5, 0) == ([1], [])
    train, valid = data_sources.split_rows(list(range(3)), 0.9, 0)
    assert len(train) == 1 and len(valid) == 2


def test_folder_without_valid_holds_out_rows(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(10)])
    loaded = load_data(cfg(tmp_path, valid_fraction=0.2), tok)
    assert (len(loaded.train), len(loaded.valid)) == (8, 2)


def test_demo_maps_to_the_shipped_folder(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", [chat("a", "b")] * 3)
    write_jsonl(tmp_path / "valid.jsonl", [chat("c", "d")])
    monkeypatch.setattr(data_sources, "DEMO_DATA", tmp_path)
    loaded = load_data(DataConfig(data="demo"), tok)
    assert loaded.format == "chat" and len(loaded.train) == 3


def test_saved_hugging_face_dataset_folder(tmp_path, tok):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(QA[:7]),
                               "validation": datasets.Dataset.from_list(QA[7:9]),
                               "test": datasets.Dataset.from_list(QA[9:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    loaded = load_data(cfg(tmp_path / "saved", mask_prompt=True), tok)
    assert (len(loaded.train), len(loaded.valid), len(loaded.test)) == (7, 2, 1)
    assert trained_text(tok, loaded.valid[0]) == f"14{IM_END}\n"
    sliced = load_data(cfg(tmp_path / "saved", hf_split="train[2:5]"), tok)
    assert len(sliced.train) == 3
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, validation, test\)"):
        load_data(cfg(tmp_path / "saved", hf_split="dev"), tok)


def test_local_dataset_folder_through_load_dataset(tmp_path, tok):
    # the layout of a dataset repository: data/<split>-00000-of-00001.<ext>, read by datasets.load_dataset
    write_jsonl(tmp_path / "repo" / "data" / "train-00000-of-00001.jsonl",
                [{"question": q["prompt"], "answer": q["completion"]} for q in QA])
    loaded = load_data(cfg(tmp_path / "repo", columns={"prompt": "question", "completion": "answer"},
                           valid_fraction=0.2, mask_prompt=True), tok)
    assert loaded.format == "completions"
    assert (len(loaded.train), len(loaded.valid)) == (8, 2)
    assert any("held out 2 of 10" in n for n in loaded.notes)
    assert any(n.startswith(f"data: Hugging Face dataset {tmp_path / 'repo'}") for n in loaded.notes)


def test_hub_name_goes_to_load_dataset_with_config(tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None):
        calls.append((name, config))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": f"t {i}"} for i in range(6)]),
                                     "test": datasets.Dataset.from_list([{"text": "x"}])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_data(DataConfig(data="someone/set:main", hf_split="train[:4]"), tok)
    assert calls == [("someone/set", "main")]
    assert (len(loaded.train), len(loaded.valid), len(loaded.test)) == (3, 1, 1)


def test_hub_failure_is_one_clear_problem(tok, monkeypatch):
    import datasets

    def failing(name, config=None):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(data="nobody/nothing"), tok)
    assert problems_of(e) == ["nobody/nothing: not a data file or folder, and the datasets library could not load "
                              "it: FileNotFoundError: Dataset 'nobody/nothing' doesn't exist on the Hub"]


def test_missing_path_empty_folder_and_ambiguous_folder(tmp_path, tok):
    with pytest.raises(DataError, match="no dataset chosen"):
        load_data(DataConfig(data=" "), tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no train/valid/test files \(.jsonl, .json, .csv, .parquet\) in this"):
        load_data(cfg(tmp_path / "empty"), tok)
    with pytest.raises(DataError, match="no such file or folder"):
        load_data(cfg(tmp_path / "nope.jsonl"), tok)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    write_as(tmp_path / "train.csv", [{"text": "a"}])
    with pytest.raises(DataError, match=r"several train files \(train.jsonl, train.csv\)"):
        load_data(cfg(tmp_path), tok)


# ---------------------------------------------------------------------------------------------- bad input


def load_problems(path, tok, **kw) -> list[str]:
    with pytest.raises(DataError) as e:
        load_data(cfg(path, **kw), tok)
    return problems_of(e)


def test_malformed_json_line_names_file_and_line(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n\n{"text": "ok"}\n', encoding="utf-8")
    assert load_problems(tmp_path, tok) == [
        f"{path}: line 2: not valid JSON (Expecting ',' delimiter at column 18)"]


def test_missing_field_names_file_line_and_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"},
                                                  {"completion": "d"}])
    assert load_problems(path, tok) == [f"{path}: line 2: missing 'completion'", f"{path}: line 3: missing 'prompt'"]


def test_missing_mapped_column_in_every_row_is_one_problem(tmp_path, tok):
    path = write_as(tmp_path / "train.csv", [{"question": "q", "reply": "r"}] * 30)
    problems = load_problems(path, tok, columns={"prompt": "question", "completion": "answer"})
    assert problems == [f"{path}: no row has 'answer' (mapped to completion), which the completions format needs "
                        "(fields found: question, reply)"]


def test_unknown_format_suggests_a_column_mapping(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    [problem] = load_problems(path, tok)
    assert problem.startswith(f"{path}: line 1: cannot tell the format from the fields question, answer")
    assert "--columns prompt=question,completion=answer" in problem


@pytest.mark.parametrize("content", ["", "   \n\n"])
def test_empty_file(tmp_path, tok, content):
    (tmp_path / "train.jsonl").write_text(content, encoding="utf-8")
    assert load_problems(tmp_path, tok) == [f"{tmp_path / 'train.jsonl'}: the file is empty"]


def test_empty_valid_file_is_reported_with_its_name(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    (tmp_path / "valid.jsonl").write_text("", encoding="utf-8")
    assert load_problems(tmp_path, tok) == [f"{tmp_path / 'valid.jsonl'}: the file is empty"]


def test_empty_strings(tmp_path, tok):
    rows = [{"prompt": "a", "completion": ""}, {"prompt": " ", "completion": "b"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows[:2])
    assert load_problems(path, tok) == [f"{path}: line 1: 'completion' is an empty string",
                                        f"{path}: line 2: 'prompt' is an empty string"]
    chat_path = write_jsonl(tmp_path / "chat.jsonl", rows[2:])
    assert load_problems(chat_path, tok) == [
        f"{chat_path}: line 1: message 2 (assistant) has an empty string as content"]


def test_wrong_types(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": 42}, ["not", "an", "object"],
                                                  {"messages": "hello"}])
    assert load_problems(path, tok, data_format="text") == [
        f"{path}: line 1: 'text' should be a string, got int",
        f"{path}: line 2: expected an object with fields, got list",
        f"{path}: line 3: missing 'text'"]


def test_role_the_template_does_not_accept(tmp_path, tok):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [chat("a", "b"), bad])
    assert load_problems(path, tok) == [
        f"{path}: line 2: message 2 has role 'bot', which the chat template does not accept "
        "(system, user, assistant, tool)"]


def test_template_that_raises_is_a_row_problem(tmp_path):
    strict = build_tokenizer(chat_template=NO_SYSTEM)
    with_system = {"messages": [{"role": "system", "content": "s"}] + chat("a", "b")["messages"]}
    path = write_jsonl(tmp_path / "train.jsonl", [chat("a", "b"), with_system])
    [problem] = load_problems(path, strict)
    assert problem.startswith(f"{path}: line 2: the chat template rejected this row:")
    assert "System role not supported" in problem


def test_dataset_smaller_than_batch_size(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "c"}])
    with pytest.raises(DataError) as e:
        load_data(cfg(tmp_path), tok, batch_size=4)
    assert problems_of(e) == [
        f"{path}: 2 usable training row(s), fewer than the batch size 4; add rows or lower the batch size"]
    assert len(load_data(cfg(tmp_path), tok, batch_size=2).train) == 2


def test_not_utf8(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "ok"}\n')
    assert load_problems(tmp_path, tok) == [
        f"{path}: line 2: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8"]
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("text\nok\nna\xefve\n".encode("latin-1"))
    assert load_problems(csv_path, tok) == [
        f"{csv_path}: line 3: not UTF-8 text (byte 0xef at column 3); save the file as UTF-8"]


def test_csv_row_with_too_many_fields(tmp_path, tok):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    assert load_problems(path, tok) == [f"{path}: line 3: 3 fields, but the header has 2"]


def test_json_file_errors(tmp_path, tok):
    path = tmp_path / "train.json"
    path.write_text('[{"text": "a"},\n {"text": }]', encoding="utf-8")
    assert load_problems(path, tok) == [f"{path}: line 2: not valid JSON (Expecting value at column 11)"]
    path.write_text('{"text": "a"}', encoding="utf-8")
    assert load_problems(path, tok) == [f"{path}: expected a list of objects, got a JSON dict"]


def test_problems_are_collected_up_to_twenty(tmp_path, tok):
    rows = [{"text": "good"}] + [{"text": ""}] * 25
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_data(cfg(path), tok)
    assert e.value.total == 25
    assert e.value.problems == [f"{path}: line {n}: 'text' is an empty string" for n in range(2, 22)]
    assert "... and 5 more problems" in str(e.value) and "--skip-bad-rows" in str(e.value)


def test_skip_bad_rows_skips_and_counts(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    good = [json.dumps({"text": f"row {i}"}) for i in range(6)]
    path.write_text("\n".join(good[:3] + ["{oops", json.dumps({"text": ""}), json.dumps({"other": 1})] + good[3:]),
                    encoding="utf-8")
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "v"}, {"text": " "}])
    loaded = load_data(cfg(tmp_path, skip_bad_rows=True), tok)
    assert (len(loaded.train), len(loaded.valid), loaded.skipped) == (6, 1, 4)
    assert any(n.startswith(f"skipped 4 bad row(s); the first: {path}: line 4: not valid JSON") for n in loaded.notes)
    # skipping never hides a dataset that ends up too small
    with pytest.raises(DataError, match="6 usable training row"):
        load_data(cfg(tmp_path, skip_bad_rows=True), tok, batch_size=8)


# ---------------------------------------------------------------------------------------------- preview, statistics


def test_preview_marks_each_token_trained_or_masked(tmp_path, tok):
    rows = [chat("Hello there", "Paris is the capital."), chat("Thank you", "I am fine"), {"messages": []}]
    path = write_jsonl(tmp_path / "train.jsonl", rows + [chat("x", "y")])
    write_jsonl(tmp_path / "valid.jsonl", [chat("x", "y")])
    keep = len(data.chat_ids(tok, rows[0]["messages"][:1], True)) + 2  # the prompt and two answer tokens
    shown = data.preview(cfg(tmp_path, mask_prompt=True), tok, n_rows=3, max_seq_length=keep)
    assert [r.where for r in shown] == [f"{path}: line {n}" for n in (1, 2, 3)]
    first = shown[0]
    tokens, weights = data.tokenize_chat(rows[0]["messages"], tok, True)
    assert (first.tokens, first.cut, first.trained) == (len(tokens), len(tokens) - keep, 2)
    assert [trained for _, trained in first.segments] == [False] * (keep - 2) + [True] * 2
    assert "".join(text for text, _ in first.segments) == tok.decode(tokens[:keep])
    assert "Paris is the capital.".startswith("".join(text for text, trained in first.segments if trained))
    assert shown[2].segments == [] and "'messages' should be a non-empty list" in shown[2].problem


def test_token_texts_rebuild_the_text_with_multibyte_characters(tok):
    text = "Ünïcödé: naïve café, 東京, Ωμέγα ☃ 😀 and more"  # the last three are unseen: split into bytes
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(tok.encode("Ünïcödé: naïve café, 東京, ", add_special_tokens=False)) + 12
    pieces = data.token_texts(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)


def test_statistics_on_a_crafted_dataset():
    loaded = LoadedData(
        train=[([1] * 5, [0, 1, 1, 1, 1]), ([1] * 10, [0] * 5 + [1] * 5), ([1] * 20, [0] + [1] * 19)],
        valid=[([1] * 3, [0, 1, 1])], format="completions", skipped=2)
    s = data.statistics(loaded, max_seq_length=8)
    assert s == {
        "format": "completions", "rows": {"train": 3, "valid": 1, "test": 0}, "skipped": 2,
        "tokens_min": 5, "tokens_median": 10, "tokens_max": 20, "tokens": 35,
        "trained_tokens": 4 + 3 + 7,  # weights within the first 8 tokens
        "max_seq_length": 8, "long_rows": 2, "tokens_cut": 2 + 12, "longest_cut": 12,
        "tokens_per_epoch": 5 + 8 + 8,
    }
    text = data.format_statistics(s)
    assert "| Rows | 3 train · 1 valid · 0 test |" in text
    assert "| Tokens per row (train) | 5 min · 10 median · 20 max |" in text
    assert "| Trained tokens | 14 (67% of the tokens) |" in text
    assert "| Longer than 8 tokens | 2 row(s), truncated by 14 tokens in all (at most 12 in one row) |" in text
    assert "| Tokens per epoch | about 21 |" in text and "| Skipped bad rows | 2 |" in text


def test_statistics_of_an_empty_split_and_loaded_data(tmp_path, tok):
    assert data.statistics(LoadedData(train=[]), 16)["tokens_median"] == 0
    write_jsonl(tmp_path / "train.jsonl", [{"text": "The quick brown fox."}, {"text": "Hello there"}])
    loaded = load_data(cfg(tmp_path / "train.jsonl"), tok)
    s = data.statistics(loaded, 2048)
    assert s["rows"]["train"] + s["rows"]["valid"] == 2 and s["long_rows"] == 0
    assert s["tokens_per_epoch"] == sum(len(t) for t, _ in loaded.train)
    assert "| Longer than 2,048 tokens | none |" in data.format_statistics(s)
