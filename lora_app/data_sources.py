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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEMO, DataConfig

SPLIT_FILES = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
HF_VALID_SPLITS = ("validation", "valid", "val", "dev")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
MAX_PROBLEMS = 20
DEMO_DATA = Path(__file__).parent.parent / "assets" / "demo_data"


class DataError(ValueError):
    """Problems found in a dataset; `problems` lists the first 20 (file, line/row, what is wrong)."""

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = problems[:MAX_PROBLEMS]
        self.total = len(problems)
        lines = list(self.problems)
        if self.total > MAX_PROBLEMS:
            lines.append(f"... and {self.total - MAX_PROBLEMS} more problems")
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
    rows = {k: [Row(f"{name} [{s}]", i, r, unit="row") for i, r in enumerate(data, 1)] for k, (s, data) in
            chosen.items()}
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
        if not line.strip():
            continue
        row = Row(str(path), number)
        try:
            row.data = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            row.problem = not_utf8(e)
        except json.JSONDecodeError as e:
            row.problem = f"not valid JSON ({e.msg} at column {e.colno})"
        rows.append(row)
    return rows


def read_json(path: Path, raw: bytes) -> list[Row]:
    text = decode(path, raw)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if len(text.strip().splitlines()) > 1 and text.lstrip().startswith("{"):
            return read_jsonl(path, raw)  # JSON Lines saved as .json, which the datasets library accepts too
        raise DataError([f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"]) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError([f"{path}: expected a list of objects, got a JSON {type(data).__name__}"])
    return [Row(str(path), i, item, unit="row") for i, item in enumerate(data, 1)]


def read_csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    rows, line = [], reader.line_num
    for record in reader:
        row = Row(str(path), line + 1, record)
        if None in record:
            row.problem = f"{len(header) + len(record[None])} fields, but the header has {len(header)}"
        rows.append(row)
        line = reader.line_num
    return rows


def read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any arrow error means the file cannot be used
        raise DataError([f"{path}: not a readable parquet file ({e})"]) from None
    return [Row(str(path), i, r, unit="row") for i, r in enumerate(table.to_pylist(), 1)]


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
