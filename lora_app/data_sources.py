"""Where a dataset's rows come from: a folder with train/valid/test files, one file (split into train/valid),
a saved or hub dataset (through `datasets`). Rows stay raw here; lora_app/data.py checks and tokenizes them.
Every problem names the file and line/row.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEMO, DataConfig

SPLIT_FILES = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
HF_VALID_SPLITS = ("validation", "valid", "val", "dev")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
MAX_PROBLEMS = 20
# Levels of lists/objects in one row. Real rows need a handful (a tool call's JSON schema perhaps 10); deeper data
# only hits Python's recursion limit later (json, chat templates, repr), so it is refused here, as a row problem.
MAX_NESTING = 100
TOO_DEEP = f"nested too deeply (more than {MAX_NESTING} levels of lists/objects)"
# One CSV field. Long documents are legitimate training text, so the bound is generous; it exists because the csv
# parser grows a field's buffer at 4 bytes a character, and without it one field could take any amount of memory.
MAX_FIELD_CHARS = 8 * 1024 * 1024
DEMO_DATA = Path(__file__).parent.parent / "assets" / "demo_data"


class DataError(ValueError):
    """Problems found in a dataset; `problems` lists the first 20 (file, line/row, what is wrong)."""

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = problems[:MAX_PROBLEMS]
        self.total = len(problems)
        lines = list(self.problems)
        if self.total > MAX_PROBLEMS:
            lines.append(f"... and {self.total - MAX_PROBLEMS} more problems")
        if hint and len(lines) == 1:  # one problem stays one line (the CLI prints it as one 'error:' line)
            lines, hint = [f"{lines[0]}. {hint}"], ""
        super().__init__("\n".join(lines + ([hint] if hint else [])))


@dataclass
class Row:
    """One raw row; `problem` is set when it could not even be read (bad JSON, not UTF-8)."""

    source: str
    number: int
    data: Any = None
    problem: str = ""
    unit: str = "line"

    @property
    def where(self) -> str:
        return f"{self.source}: {self.unit} {self.number}"


@dataclass
class Source:
    rows: dict[str, list[Row]]
    names: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def by_file(self) -> dict[str, list[Row]]:
        """Rows grouped by the file (or dataset split) they came from, in file order: a held-out
        validation split comes from the same file as train."""
        files: dict[str, list[Row]] = {}
        for rows in self.rows.values():
            for row in rows:
                files.setdefault(row.source, []).append(row)
        return {name: sorted(rows, key=lambda r: r.number) for name, rows in files.items()}

    def order(self, item: tuple[Row, str]) -> tuple[int, int]:
        """Sort key that reports problems file by file, in line order."""
        names = list(dict.fromkeys(self.names.values()))
        row = item[0]
        return (names.index(row.source) if row.source in names else len(names), row.number)


# ---------------------------------------------------------------------------------------------- sources


def read_source(cfg: DataConfig) -> Source:
    """Rows of each split from a folder, a single file, a saved dataset or a Hugging Face dataset name."""
    if not cfg.data.strip():
        raise DataError(["data: no dataset chosen (a folder, a file, a Hugging Face dataset or 'demo')"])
    path = DEMO_DATA if cfg.data == DEMO else Path(cfg.data).expanduser()
    if path.is_dir():
        files = split_files(path)
        if files:
            return folder_source(cfg, files)
        return hf_source(cfg, str(path))
    if path.is_file():
        return single_file_source(cfg, path)
    if cfg.data == DEMO or looks_like_path(cfg.data):
        raise DataError([f"{path}: no such file or folder"])
    return hf_source(cfg, cfg.data)


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(EXTENSIONS)


def split_files(folder: Path) -> dict[str, Path]:
    """train/valid/test files in a folder (one per split; two candidates for a split is an error)."""
    found = {}
    for split, stems in SPLIT_FILES.items():
        matches = [folder / f"{s}{e}" for s in stems for e in EXTENSIONS if (folder / f"{s}{e}").is_file()]
        if len(matches) > 1:
            raise DataError([f"{folder}: several {split} files ({', '.join(p.name for p in matches)}); keep one"])
        if matches:
            found[split] = matches[0]
    if found and "train" not in found:
        raise DataError([f"{folder}: no train file (train.jsonl, .json, .csv or .parquet)"])
    return found


def folder_source(cfg: DataConfig, files: dict[str, Path]) -> Source:
    rows, names = {}, {}
    problems = []
    for split, path in files.items():
        try:
            rows[split] = read_rows(path)
        except DataError as e:
            problems += e.problems
        names[split] = str(path)
    if problems:
        raise DataError(problems)
    notes = [f"data: {', '.join(f'{s} {p.name}' for s, p in files.items())} in {files['train'].parent}"]
    if "valid" not in rows:
        notes.append(hold_out(cfg, rows, names))
    return Source(rows, names, notes)


def single_file_source(cfg: DataConfig, path: Path) -> Source:
    rows = {"train": read_rows(path)}
    names = {"train": str(path)}
    return Source(rows, names, [f"data: {path}", hold_out(cfg, rows, names)])


def hold_out(cfg: DataConfig, rows: dict[str, list[Row]], names: dict[str, str]) -> str:
    """Move a seeded random valid_fraction of the train rows into a validation split; return a note."""
    rows["train"], rows["valid"] = split_rows(rows["train"], cfg.valid_fraction, cfg.split_seed)
    names["valid"] = names["train"]
    return (f"no validation split: held out {len(rows['valid'])} of {len(rows['train']) + len(rows['valid'])} "
            f"rows ({cfg.valid_fraction:.0%}, seed {cfg.split_seed})")


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) rows (at least 1, and never all); the same seed gives the same split."""
    n = len(rows)
    n_valid = min(max(1, round(n * fraction)), n - 1) if n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_valid])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def hf_source(cfg: DataConfig, name: str) -> Source:
    """A Hugging Face dataset: a folder saved with save_to_disk, a local dataset folder, or a hub name
    (`owner/name` or `owner/name:config`)."""
    import datasets

    try:
        if (Path(name) / "dataset_dict.json").is_file() or (Path(name) / "state.json").is_file():
            loaded = datasets.load_from_disk(name)
        elif Path(name).is_dir():
            loaded = datasets.load_dataset(name)
        else:
            repo, _, config = name.partition(":")
            loaded = datasets.load_dataset(repo, config or None)
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad files: one clear line
        what = ("no train/valid/test files (.jsonl, .json, .csv, .parquet) in this folder" if Path(name).is_dir()
                else "not a data file or folder")
        raise DataError([f"{name}: {what}, and the datasets library could not load it: {type(e).__name__}: {e}"]
                        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return hf_splits(cfg, name, loaded)


def hf_splits(cfg: DataConfig, name: str, loaded: Any) -> Source:
    available = list(loaded.keys())
    split, lo, hi = parse_split(cfg.hf_split or ("train" if "train" in available else available[0]))
    if split not in available:
        raise DataError([f"{name}: no split {split!r} (splits: {', '.join(available)})"])
    train = loaded[split]
    if lo is not None or hi is not None:
        train = train.select(range(*slice(lo, hi).indices(len(train))))
    chosen = {"train": (split, train.to_list())}
    valid = next((s for s in HF_VALID_SPLITS if s in available and s != split), None)
    if valid:
        chosen["valid"] = (valid, loaded[valid].to_list())
    if "test" in available and split != "test":
        chosen["test"] = ("test", loaded["test"].to_list())
    rows = {k: checked([Row(f"{name} [{s}]", i, r, unit="row") for i, r in enumerate(data, 1)])
            for k, (s, data) in chosen.items()}
    names = {k: f"{name} [{s}]" for k, (s, _) in chosen.items()}
    notes = [f"data: Hugging Face dataset {name}, splits {', '.join(f'{k}={s}' for k, (s, _) in chosen.items())}"]
    if "valid" not in rows:
        notes.append(hold_out(cfg, rows, names))
    return Source(rows, names, notes)


def parse_split(spec: str) -> tuple[str, int | None, int | None]:
    """'train', 'train[:1000]' or 'train[100:200]' -> (name, start, stop)."""
    m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*", spec)
    if not m:
        raise DataError([f"hf_split: expected a split name like train or train[:1000], got {spec!r}"])
    return m[1], int(m[2]) if m[2] else None, int(m[3]) if m[3] else None


# ---------------------------------------------------------------------------------------------- files


def read_rows(path: Path) -> list[Row]:
    """The rows of one .jsonl/.json/.csv/.parquet file; file-level problems raise DataError."""
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError([f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet"])
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError([f"{path}: the file is empty"])
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = read_parquet(path)
    elif suffix == ".jsonl":
        rows = read_jsonl(path, raw)
    elif suffix == ".json":
        rows = read_json(path, raw)
    else:
        rows = read_csv(path, decode(path, raw))
    if not rows:
        raise DataError([f"{path}: the file has no rows"])
    return rows


def read_jsonl(path: Path, raw: bytes) -> list[Row]:
    rows = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            data, problem = parse_line(line, number == 1)
            rows.append(Row(str(path), number, data, problem))
    return rows


def parse_line(line: bytes, first: bool) -> tuple[Any, str]:
    """One JSON Lines row, or the reason it cannot be read."""
    try:
        data = json.loads(line.decode("utf-8-sig" if first else "utf-8"))
    except UnicodeDecodeError as e:
        return None, not_utf8(e)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:  # json gives up at Python's recursion limit (about 1000 levels)
        return None, TOO_DEEP
    # counting brackets is fast C; only a line with many of them can be too deep, so only those are walked
    if line.count(b"[") + line.count(b"{") > MAX_NESTING and nesting_problem(data):
        return None, TOO_DEEP
    return data, ""


def read_json(path: Path, raw: bytes) -> list[Row]:
    text = decode(path, raw)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        if len(text.strip().splitlines()) > 1 and text.lstrip().startswith("{"):
            return read_jsonl(path, raw)  # JSON Lines saved as .json, which the datasets library accepts too
        if isinstance(e, RecursionError):  # one document: it cannot be split into rows
            raise DataError([f"{path}: cannot be read: {TOO_DEEP}"]) from None
        raise DataError([f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"]) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError([f"{path}: expected a list of objects, got a JSON {type(data).__name__}"])
    return checked([Row(str(path), i, item, unit="row") for i, item in enumerate(data, 1)])


def checked(rows: list[Row]) -> list[Row]:
    """Mark rows nested too deeply (from a .json list, parquet or the datasets library) as bad rows."""
    for row in rows:
        if not row.problem and nesting_problem(row.data):
            row.data, row.problem = None, TOO_DEEP
    return rows


def nesting_problem(value: Any) -> str:
    """TOO_DEEP when lists/objects nest more than MAX_NESTING levels, else ''. Iterative, so it cannot hit the
    recursion limit itself."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        if children and depth > MAX_NESTING:
            return TOO_DEEP
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return ""


def read_csv(path: Path, text: str) -> list[Row]:
    """Rows keyed by the header. A record the csv module refuses (a field over MAX_FIELD_CHARS) is a bad row, and
    reading goes on after it."""
    stream = io.StringIO(text, newline="")
    reader = csv.reader(stream)
    rows: list[Row] = []
    with csv_field_limit(MAX_FIELD_CHARS):
        try:
            header = next(reader, [])
        except csv.Error as e:
            raise DataError([f"{path}: line 1 (the header): {csv_problem(e)}"]) from None
        line, seen = 1, 0
        while True:
            start = stream.tell()
            # the record's first line, counted here: after a refused record, reader.line_num is off
            line += text.count("\n", seen, start)
            seen = start
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                rows.append(Row(str(path), line, problem=csv_problem(e)))
                # the reader stops mid-record; its rest (a quoted field may span lines) must not become rows
                stream.seek(record_end(text, start))
                continue
            if values:  # a blank line is no row
                rows.append(csv_row(path, line, header, values))
    return rows


def csv_row(path: Path, line: int, header: list[str], values: list[str]) -> Row:
    """As csv.DictReader makes it: missing fields are None; extra fields make the row bad."""
    row = Row(str(path), line, {**dict.fromkeys(header), **dict(zip(header, values))})
    if len(values) > len(header):
        row.problem = f"{len(values)} fields, but the header has {len(header)}"
    return row


@contextmanager
def csv_field_limit(limit: int) -> Iterator[None]:
    """The csv module's field limit is process-wide: set ours while reading, then put the old one back."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def csv_problem(e: csv.Error) -> str:
    if "field limit" in str(e):
        return (f"a field is longer than {MAX_FIELD_CHARS:,} characters; split the text into several rows "
                "or use .jsonl")
    return f"not valid CSV ({e})"


CSV_FIELD_END = re.compile(r"[,\r\n]")


def record_end(text: str, start: int) -> int:
    """Where the CSV record that begins at `start` ends (past its line break), read as the default dialect does:
    a field that starts with a quote runs to the next quote that is not doubled, and may span lines."""
    i = start
    while i < len(text):
        if text[i] == '"':
            i = quoted_field_end(text, i + 1)
        match = CSV_FIELD_END.search(text, i)
        if match is None:
            return len(text)
        i = match.end()
        if match[0] != ",":
            return i + 1 if match[0] == "\r" and text.startswith("\n", i) else i
    return len(text)


def quoted_field_end(text: str, i: int) -> int:
    """The index after the closing quote of a quoted field whose text starts at i ("" is a quote inside)."""
    while (j := text.find('"', i)) >= 0:
        if not text.startswith('"', j + 1):
            return j + 1
        i = j + 2
    return len(text)


def read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any arrow error means the file cannot be used
        raise DataError([f"{path}: not a readable parquet file ({e})"]) from None
    return checked([Row(str(path), i, r, unit="row") for i, r in enumerate(table.to_pylist(), 1)])


def decode(path: Path, raw: bytes) -> str:
    """UTF-8 text, or a DataError naming every line that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    problems = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{path}: line {number}: {not_utf8(e)}")
    raise DataError(problems)


def not_utf8(e: UnicodeDecodeError) -> str:
    return (f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at column {e.start + 1}); "
            "save the file as UTF-8")
