"""Datasets: detect the format of the rows lora_app/data_sources.py read, check them, tokenize them with a
loss mask; the token-level preview and statistics.

Every example becomes `(tokens, weights)`: token ids and one 0/1 weight per token, where weight[i] = 1 means
"token i is a training target" (the loss of predicting it from tokens[:i] counts). weights[0] is always 0.

Formats: text, completions (prompt/completion), chat (messages), instruction (instruction/input/output);
`columns` maps other column names onto these fields. Every problem names the file and line/row.
"""

from __future__ import annotations

import os
import reprlib
import statistics as stats
from dataclasses import dataclass, field
from typing import Any

from .config import DataConfig
from .data_sources import DataError, Row, Source, read_source

Example = tuple[list[int], list[int]]
SPLITS = ("train", "valid", "test")
SIDES = ("chosen", "rejected")  # a preference row's answers
FORMATS = ("text", "completions", "chat", "instruction", "preference")
REQUIRED = {"text": ("text",), "completions": ("prompt", "completion"), "chat": ("messages",),
            "instruction": ("instruction", "output"), "preference": ("chosen", "rejected")}
FIELDS = ("text", "prompt", "completion", "messages", "instruction", "input", "output", "system", "chosen",
          "rejected")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "function": "tool", "observation": "tool"}
SKIP_HINT = "Fix these rows, or skip them with --skip-bad-rows (the 'Skip bad rows' box in the app)."
# The Data step's statistics tokenize at most this many rows / tokens per split: tokenizing a 200 MB file took
# minutes and gigabytes; the first rows tell the shape of a dataset, and training checks every row anyway.
SAMPLE_ROWS = 2000
SAMPLE_TOKENS = 2_000_000
SHOWN_TOKENS = 4096  # tokens of one row the preview decodes and sends to the page (a long document has 100k+)


@dataclass
class LoadedData:
    train: list[Example]
    valid: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    format: str = ""
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    sampled: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (rows checked, rows) when cut


@dataclass
class PreviewRow:
    """One row as the trainer sees it: each kept token's text and whether it is trained."""

    where: str
    segments: list[tuple[str, bool]]
    tokens: int = 0
    trained: int = 0
    cut: int = 0  # tokens past max_seq_length, dropped by truncation
    problem: str = ""
    hidden: int = 0  # kept tokens not shown (past SHOWN_TOKENS)


# ---------------------------------------------------------------------------------------------- loading


def load_data(cfg: DataConfig, tokenizer: Any, *, batch_size: int = 1, source: Source | None = None,
              sample: tuple[int, int] | None = None) -> LoadedData:
    """Read (unless `source` was read already), check and tokenize every split; raise DataError (all problems, up
    to 20) instead of half a dataset. `sample` (rows, tokens) checks only the first rows of each split (the
    Data step's statistics); `sampled` then says how many."""
    source = source or read_source(cfg)
    fmt, note = choose_format(cfg, source)
    loaded = LoadedData(train=[], format=fmt, notes=source.notes + [note])
    loaded.notes += template_notes(fmt, tokenizer)
    bad_rows = []
    for split, rows in source.rows.items():
        examples, bad, checked = tokenize_rows(rows, fmt, cfg, tokenizer, sample)
        setattr(loaded, split, examples)
        bad_rows += bad
        if checked < len(rows):
            loaded.sampled[split] = (checked, len(rows))
    problems = [f"{row.where}: {problem}" for row, problem in sorted(bad_rows, key=source.order)]
    if problems and not cfg.skip_bad_rows:
        raise DataError(problems, hint=SKIP_HINT)
    if problems:
        loaded.skipped = len(problems)
        loaded.notes.append(f"skipped {len(problems)} bad row(s); the first: {problems[0]}")
    check_sizes(loaded, source, batch_size)
    return loaded


def tokenize_rows(rows: list[Row], fmt: str, cfg: DataConfig, tokenizer: Any,
                  sample: tuple[int, int] | None = None) -> tuple[list[Example], list, int]:
    """The examples of the good rows, (row, problem) for the others, and how many rows were checked: all, or
    with `sample` (rows, tokens) the first ones until either budget is spent."""
    max_rows, max_tokens = sample or (len(rows), float("inf"))
    examples, problems, tokens = [], [], 0
    for checked, row in enumerate(rows):
        if checked >= max_rows or tokens >= max_tokens:
            return examples, problems, checked
        example, problem = row_example(row, fmt, cfg, tokenizer)
        if problem:
            problems.append((row, problem))
        else:
            examples.append(example)
            tokens += len(example[0])
    return examples, problems, len(rows)


def row_example(row: Row, fmt: str, cfg: DataConfig, tokenizer: Any) -> tuple[Example | None, str]:
    """The row's example, or the reason it cannot be used."""
    if row.problem:
        return None, row.problem
    data = map_columns(row.data, cfg.columns)
    problem = row_problem(data, fmt, cfg.columns, cfg.mask_prompt)
    if problem:
        return None, problem
    try:
        return tokenize_row(data, fmt, tokenizer, cfg.mask_prompt), ""
    except Exception as e:  # noqa: BLE001 - a template that rejects a row (raise_exception) is a row problem
        return None, f"the chat template rejected this row: {type(e).__name__}: {e}"


def check_sizes(loaded: LoadedData, source: Source, batch_size: int) -> None:
    checked, total = loaded.sampled.get("train", (0, 0))
    n = len(loaded.train) + total - checked  # rows not checked (a sample) count as usable here
    if n < batch_size:
        raise DataError([(f"{source.names['train']}: {n} usable training row(s), fewer than the batch size "
                         f"{batch_size}; add rows or lower the batch size")])
    if source.rows.get("valid") and not loaded.valid:
        loaded.notes.append("every validation row was skipped: no validation set")
    elif 0 < len(loaded.valid) < batch_size:
        loaded.notes.append(f"the validation set has {len(loaded.valid)} row(s), fewer than the batch size")


def template_notes(fmt: str, tokenizer: Any) -> list[str]:
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise DataError([("the tokenizer has no chat template, which chat (messages) data needs; "
                         "use a chat model or text/completions data")])
    if fmt in ("completions", "instruction") and not has_chat_template(tokenizer):
        return ["the tokenizer has no chat template: prompt and completion are joined as plain text"]
    return []


# ---------------------------------------------------------------------------------------------- formats


def choose_format(cfg: DataConfig, source: Source) -> tuple[str, str]:
    """The format (set, or detected from the first train row) and a note saying which and why."""
    unknown = sorted(set(cfg.columns) - set(FIELDS))
    if unknown:
        raise DataError([f"columns: unknown field(s) {', '.join(unknown)}; map onto {', '.join(FIELDS)}"])
    if cfg.data_format != "auto":
        if cfg.data_format not in FORMATS:
            raise DataError([f"data_format: expected auto or one of {', '.join(FORMATS)}, got {cfg.data_format!r}"])
        check_columns(source, cfg.data_format, cfg.columns)
        return cfg.data_format, f"format: {cfg.data_format} (set by data_format)"
    train_file = source.by_file()[source.names["train"]]
    first = next((r for r in train_file if isinstance(r.data, dict)), None)
    if first is None:
        raise DataError([f"{source.names['train']}: no readable row to detect the format from"] +
                        [f"{r.where}: {r.problem or 'not an object with fields'}" for r in train_file])
    # mapped columns count even when the first row lacks them: check_columns then names what is missing
    fmt = detect_format({**map_columns(first.data, cfg.columns), **dict.fromkeys(cfg.columns)})
    if not fmt:
        raise DataError([(f"{first.where}: cannot tell the format from the fields {', '.join(map(str, first.data))}; "
                         "expected text, prompt+completion, messages, instruction+output, or chosen+rejected; "
                         "map yours with "
                         "columns, e.g. --columns prompt=question,completion=answer")])
    check_columns(source, fmt, cfg.columns)
    return fmt, f"detected format: {fmt} (from the fields of {first.where})"


def detect_format(row: dict) -> str:
    """The format a row's fields suggest; '' when none fits."""
    if "chosen" in row and "rejected" in row:  # pairs.py: DPO / ORPO
        return "preference"
    if "messages" in row or "conversations" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completions"
    if "instruction" in row and "output" in row:
        return "instruction"
    if "text" in row:
        return "text"
    return ""


def check_columns(source: Source, fmt: str, columns: dict[str, str]) -> None:
    """A field missing from every row of a split is one problem about the split, not one per row."""
    problems = []
    for file, rows in source.by_file().items():
        readable = [map_columns(r.data, columns) for r in rows if isinstance(r.data, dict)]
        for name in REQUIRED[fmt]:
            if readable and not any(name in d for d in readable):
                seen = sorted({str(k) for r in rows if isinstance(r.data, dict) for k in r.data})
                problems.append(f"{file}: no row has {column_label(name, columns)}, which the {fmt} "
                                f"format needs (fields found: {', '.join(seen)})")
    if problems:
        raise DataError(problems)


def map_columns(row: Any, columns: dict[str, str]) -> Any:
    """Rename mapped columns onto our field names; ShareGPT `conversations` become `messages`."""
    if not isinstance(row, dict):
        return row
    row = {**row, **{f: row[c] for f, c in columns.items() if c in row}}
    if "messages" not in row and isinstance(row.get("conversations"), list):
        row["messages"] = [from_sharegpt(m) for m in row["conversations"]]
    return row


def from_sharegpt(message: Any) -> Any:
    if not isinstance(message, dict) or "from" not in message:
        return message
    role = SHAREGPT_ROLES.get(message["from"], message["from"])
    return {"role": role, "content": message.get("value")}


def column_label(name: str, columns: dict[str, str]) -> str:
    return f"'{columns[name]}' (mapped to {name})" if name in columns else f"'{name}'"


def row_problem(row: Any, fmt: str, columns: dict[str, str], mask_prompt: bool) -> str:
    """What makes a row unusable for its format ('' when nothing)."""
    if not isinstance(row, dict):
        return f"expected an object with fields, got {type(row).__name__}"
    if fmt == "preference":
        return pair_problem(row, lambda name: column_label(name, columns))
    if fmt == "chat":
        if row.get("messages") is None:
            return f"missing {column_label('messages', columns)}"
        return messages_problem(row["messages"], mask_prompt)
    for name in REQUIRED[fmt]:
        if row.get(name) is None:
            return f"missing {column_label(name, columns)}"
    for name in ("text", "prompt", "completion", "instruction", "input", "output", "system"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            return f"{column_label(name, columns)} should be a string, got {type(value).__name__}"
        if name in REQUIRED[fmt] and not value.strip():
            return f"{column_label(name, columns)} is an empty string"
    return ""


def messages_problem(messages: Any, mask_prompt: bool) -> str:
    if not isinstance(messages, list) or not messages:
        return "'messages' should be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {i} is not an object with role and content"
        role = m.get("role")
        if role not in ROLES:  # reprlib: a role can be any JSON value, of any length
            return (f"message {i} has role {reprlib.repr(role)}, which the chat template does not accept "
                    f"({', '.join(ROLES)})")
        content = m.get("content")
        if content is None and m.get("tool_calls"):
            continue
        if not isinstance(content, str):
            return f"message {i} ({role}) has no text 'content'"
        if not content.strip():
            return f"message {i} ({role}) has an empty string as content"
    if mask_prompt and not any(m["role"] == "assistant" for m in messages):
        return "no assistant message, so nothing would be trained with mask_prompt"
    return ""


# ---------------------------------------------------------------------------------------------- tokenizing


def tokenize_row(row: dict, fmt: str, tokenizer: Any, mask_prompt: bool) -> Example:
    """Tokenize a checked row of the given format (after column mapping)."""
    if fmt == "text":
        tokens = list(tokenizer.encode(row["text"]))
        if tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
        return tokens, [0] + [1] * (len(tokens) - 1)
    if fmt == "chat":
        return tokenize_chat(row["messages"], tokenizer, mask_prompt, tools=row.get("tools"))
    if fmt == "preference":  # a pair of examples: (chosen, rejected)
        return tokenize_pair(row, tokenizer)
    prompt, completion = prompt_completion(row, fmt)
    if not has_chat_template(tokenizer):
        return tokenize_plain(prompt, completion, tokenizer, mask_prompt)
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    messages = system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return tokenize_chat(messages, tokenizer, mask_prompt)


def prompt_completion(row: dict, fmt: str) -> tuple[str, str]:
    if fmt == "completions":
        return row["prompt"], row["completion"]
    extra = row.get("input") or ""
    return row["instruction"] + (f"\n\n{extra}" if extra.strip() else ""), row["output"]


def tokenize_plain(prompt: str, completion: str, tokenizer: Any, mask_prompt: bool) -> Example:
    """For tokenizers without a chat template: prompt then completion then EOS."""
    head = list(tokenizer.encode(prompt))
    tail = list(tokenizer.encode(completion, add_special_tokens=False)) + [tokenizer.eos_token_id]
    tokens = head + tail
    if not mask_prompt:
        return tokens, [0] + [1] * (len(tokens) - 1)
    return tokens, [0] * len(head) + [1] * len(tail)


def tokenize_chat(messages: list[dict], tokenizer: Any, mask_prompt: bool, tools: Any = None) -> Example:
    """Chat through the model's template; with mask_prompt, every assistant turn is trained, nothing else."""
    tokens = chat_ids(tokenizer, messages, tools=tools)
    if not mask_prompt:
        return tokens, [0] + [1] * (len(tokens) - 1)
    weights = [0] * len(tokens)
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        # the turn spans from the end of "prefix + generation prompt" to the end of "prefix + this turn";
        # common prefixes keep this right for templates that render earlier turns differently
        start = common_prefix(tokens, chat_ids(tokenizer, messages[:k], True, tools)) if k else 0
        end = common_prefix(tokens, chat_ids(tokenizer, messages[: k + 1], tools=tools))
        weights[start:end] = [1] * (end - start)
    weights[0] = 0
    return tokens, weights


def chat_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, tools: Any = None) -> list[int]:
    """Token ids from apply_chat_template; transformers 5 may return a BatchEncoding/dict even so."""
    kwargs = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        return_dict=False, **kwargs)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    out = list(out)
    if out and isinstance(out[0], list):  # a batch of one
        out = out[0]
    return [int(t) for t in out]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def has_chat_template(tokenizer: Any) -> bool:
    """Works for mlx-lm's TokenizerWrapper (has_chat_template) and plain transformers tokenizers (chat_template)."""
    return bool(getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None))


# ---------------------------------------------------------------------------------------------- preference pairs

def pair_problem(row: dict, label: Any) -> str:
    """What makes a preference row unusable ('' when nothing); `label(name)` names a field as the user wrote it.
    Rows: {prompt, chosen, rejected} as text, or chosen and rejected as conversations ending in the judged
    assistant turn (an optional prompt: the messages before it); pairs.py batches them for DPO and ORPO."""
    prompt = row.get("prompt")
    for side in SIDES:
        value = row.get(side)
        if value is None:
            return f"missing {label(side)}"
        if isinstance(value, str):
            if not value.strip():
                return f"{label(side)} is an empty string"
            if not isinstance(prompt, str) or not prompt.strip():
                return (f"{label(side)} is text, so {label('prompt')} must be a non-empty string" if prompt is not None
                        else f"missing {label('prompt')}, which text answers need")
        elif isinstance(value, list):
            messages = (prompt if isinstance(prompt, list) else []) + value
            problem = messages_problem(messages, mask_prompt=False)
            if problem:
                return f"{label(side)}: {problem}"
            if messages[-1].get("role") != "assistant":
                return f"{label(side)}: the last message must be the assistant's answer that is judged"
        else:
            return f"{label(side)} should be a string or a list of messages, got {type(value).__name__}"
    return ""


def tokenize_pair(row: dict, tokenizer: Any) -> tuple[Example, Example]:
    """The chosen and the rejected example of a checked row; only the judged answer carries weight."""
    chosen, rejected = (tokenize_answer(row, side, tokenizer) for side in SIDES)
    return chosen, rejected


def tokenize_answer(row: dict, side: str, tokenizer: Any) -> Example:
    answer, prompt = row[side], row.get("prompt")
    if isinstance(answer, str) and not has_chat_template(tokenizer):
        return tokenize_plain(prompt, answer, tokenizer, mask_prompt=True)
    if isinstance(answer, str):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    else:
        messages = (prompt if isinstance(prompt, list) else []) + answer
    tokens = chat_ids(tokenizer, messages)
    start = common_prefix(tokens, chat_ids(tokenizer, messages[:-1], True))
    return tokens, [0] * start + [1] * (len(tokens) - start)



# ---------------------------------------------------------------------------------------------- preview, statistics


def preview(cfg: DataConfig, tokenizer: Any, n_rows: int = 3, max_seq_length: int = 2048,
            source: Source | None = None, objective: str = "sft") -> list[PreviewRow]:
    """The first training rows as tokens marked trained/masked; a bad row carries its problem instead. Pairs show
    what the objective trains: DPO / ORPO both answers, SFT only the chosen one (session.for_objective)."""
    source = source or read_source(cfg)
    fmt, _ = choose_format(cfg, source)
    template_notes(fmt, tokenizer)  # raises for chat data and a tokenizer without a chat template
    out = []
    for row in source.rows["train"][:n_rows]:
        example, problem = row_example(row, fmt, cfg, tokenizer)
        if example is None:
            out.append(PreviewRow(row.where, [], problem=problem))
            continue
        sides = list(zip(SIDES, example)) if fmt == "preference" else [("", example)]
        sides = sides[:1] if fmt == "preference" and objective == "sft" else sides
        for side, (tokens, weights) in sides:  # a pair: its chosen row, then its rejected row
            kept = min(len(tokens), max_seq_length)
            shown = min(kept, SHOWN_TOKENS)
            segments = list(zip(token_texts(tokenizer, tokens[:shown]), [bool(w) for w in weights[:shown]]))
            out.append(PreviewRow(f"{row.where} · {side}" if side else row.where, segments, len(tokens),
                                  sum(weights[:kept]), len(tokens) - kept, hidden=kept - shown))
    return out


def objective_note(fmt: str, objective: str) -> str:
    """What the objective makes of data of this format ('' when nothing to say): session.for_objective's rule."""
    if fmt == "preference" and objective == "sft":
        return "objective sft on preference data: training on the chosen answers (dpo or orpo trains on the pairs)"
    if fmt != "preference" and objective != "sft":
        return (f"objective {objective} needs preference data: rows with chosen and rejected answers (this data's "
                f"format is {fmt}); training would stop here")
    return ""


def token_texts(tokenizer: Any, tokens: list[int], context: int = 8) -> list[str]:
    """The text each token adds, decoded with a few tokens of context so spaces and multi-byte characters
    come out right; a character split over several tokens is shown on its last one."""
    texts = []
    for i in range(len(tokens)):
        window = tokens[max(0, i - context): i]
        before = tokenizer.decode(window, skip_special_tokens=False) if window else ""
        now = tokenizer.decode(window + [tokens[i]], skip_special_tokens=False)
        piece = now[len(os.path.commonprefix([before, now])):]
        texts.append(piece.rstrip("\ufffd"))  # an unfinished character shows up on the token that ends it
    return texts


def statistics(loaded: LoadedData, max_seq_length: int, objective: str = "sft") -> dict[str, Any]:
    """Rows per split and, for the training split, tokens per row, trained tokens and truncation (preference
    data: per answer, each pair counting as its two answers for DPO / ORPO, as its chosen answer for SFT)."""
    train = loaded.train
    if loaded.format == "preference":
        train = [pair[0] for pair in train] if objective == "sft" else [side for pair in train for side in pair]
    lengths = [len(tokens) for tokens, _ in train]
    cuts = [n - max_seq_length for n in lengths if n > max_seq_length]
    s = {
        "format": loaded.format,
        "rows": {split: len(getattr(loaded, split)) for split in SPLITS},
        "skipped": loaded.skipped,
        "tokens_min": min(lengths, default=0),
        "tokens_median": stats.median(lengths) if lengths else 0,
        "tokens_max": max(lengths, default=0),
        "tokens": sum(lengths),
        "trained_tokens": sum(sum(w[:max_seq_length]) for _, w in train),
        "max_seq_length": max_seq_length,
        "long_rows": len(cuts),
        "tokens_cut": sum(cuts),
        "longest_cut": max(cuts, default=0),
        "tokens_per_epoch": sum(min(n, max_seq_length) for n in lengths),
    }
    return s | sample_statistics(loaded, s) if loaded.sampled else s


def sample_statistics(loaded: LoadedData, s: dict[str, Any]) -> dict[str, Any]:
    """When only the first rows were tokenized: rows per split as in the files, how many were checked, and the
    sums (tokens, trained tokens, long rows) scaled from the checked rows to all rows; min/median/max stay."""
    rows = {split: loaded.sampled.get(split, (0, len(getattr(loaded, split))))[1] for split in SPLITS}
    checked, total = loaded.sampled.get("train", (1, 1))
    sums = ("tokens", "trained_tokens", "long_rows", "tokens_cut", "tokens_per_epoch")
    return {"rows": rows, "sampled": {split: list(v) for split, v in loaded.sampled.items()},
            **{key: round(s[key] * total / max(checked, 1)) for key in sums}}


def format_statistics(s: dict[str, Any]) -> str:
    """The statistics as a small markdown table for the Data step."""
    rows = s["rows"]
    share = s["trained_tokens"] / s["tokens_per_epoch"] if s["tokens_per_epoch"] else 0
    long = (f"{s['long_rows']:,} row(s), truncated by {s['tokens_cut']:,} tokens in all "
            f"(at most {s['longest_cut']:,} in one row)") if s["long_rows"] else "none"
    lines = [
        "| | |", "|---|---|",
        f"| Format | {s['format']} |",
        f"| Rows | {rows['train']:,} train · {rows['valid']:,} valid · {rows['test']:,} test |",
        (f"| Tokens per row (train) | {s['tokens_min']:,} min · {s['tokens_median']:,g} median · "
        f"{s['tokens_max']:,} max |"),
        f"| Trained tokens | {s['trained_tokens']:,} ({share:.0%} of the tokens) |",
        f"| Longer than {s['max_seq_length']:,} tokens | {long} |",
        f"| Tokens per epoch | about {s['tokens_per_epoch']:,} |",
    ]
    if s.get("sampled"):
        checked = " · ".join(f"the first {n:,} of {total:,} {split} rows" for split, (n, total) in s["sampled"].items())
        lines.insert(4, f"| Tokens counted in | {checked}; sums are estimated for all rows (training checks "
                        "every row) |")
    if s["skipped"]:
        lines.append(f"| Skipped bad rows | {s['skipped']:,} |")
    return "\n".join(lines)
