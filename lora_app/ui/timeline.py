"""Run events -> what the Train step shows: loss frame, progress with ETA, live stats, the sample timeline.

Engine-free (pandas only). A resumed run re-emits the steps after its last checkpoint: the last value per
step wins, so the curve has no doubled points.
"""

from __future__ import annotations

import html
from pathlib import Path
from threading import Lock

import pandas as pd

from .. import runs
from .estimates import human_bytes

LOSS_COLUMNS = ["step", "loss", "series"]


def loss_frame(events: list[dict]) -> pd.DataFrame:
    """Columns step, loss, series (train / valid); one point per (series, step), the latest one."""
    points: dict[tuple[str, int], float] = {}
    for e in events:
        if e["event"] == "train":
            points[("train", int(e["step"]))] = float(e["loss"])
        elif e["event"] == "val":
            points[("valid", int(e["step"]))] = float(e["val_loss"])
    rows = [(step, loss, series) for (series, step), loss in sorted(points.items(), key=lambda kv: kv[0][1])]
    # Typed even when empty: the plot reads numeric columns as a quantitative axis, not as categories.
    return pd.DataFrame(rows, columns=LOSS_COLUMNS).astype({"step": "int64", "loss": "float64", "series": "str"})


# What the charts beyond loss show: event field -> title. Learning rate and gradient norm come with every train
# report; reward margin and accuracy with preference runs' train and val events (objective metrics).
METRICS = {"learning_rate": "Learning rate", "grad_norm": "Gradient norm", "reward_margin": "Reward margin",
           "reward_accuracy": "Reward accuracy"}


def metric_frame(events: list[dict], metric: str) -> pd.DataFrame:
    """Like loss_frame for another field of the train (series train) and val (series valid) events: the value
    in the `loss` column, so the same plot and comparison code draw it."""
    points: dict[tuple[str, int], float] = {}
    for e in events:
        if e["event"] in ("train", "val") and e.get(metric) is not None:
            points[("train" if e["event"] == "train" else "valid", int(e["step"]))] = float(e[metric])
    rows = [(step, value, series) for (series, step), value in sorted(points.items(), key=lambda kv: kv[0][1])]
    return pd.DataFrame(rows, columns=LOSS_COLUMNS).astype({"step": "int64", "loss": "float64", "series": "str"})


def metric_frames(events: list[dict], most: int | None = None) -> dict[str, pd.DataFrame]:
    """Each metric this run reports (METRICS order), thinned to `most` points a series when given."""
    frames = {m: metric_frame(events, m) for m in METRICS}
    return {m: thin(f, most) if most else f for m, f in frames.items() if not f.empty}


def thin(frame: pd.DataFrame, most: int, recent: int = 50) -> pd.DataFrame:
    """At most `most` points per series: the `recent` newest all kept (so each report is drawn as it comes, and
    stays), the older ones evenly spaced over their steps, the first kept. Each update sends and redraws the
    whole plot, so a long run's page would grow heavy: with gradio's LinePlot, which drew it before
    loss_plot.py, ~35 ms of chromium CPU with no point, ~70 with 300 and ~135 with 1,000 on a 2-core machine
    (bench/page_cpu.py --points). The SVG costs the page about the same at 0 and 200 points, and 200 keep each
    update's SVG at ~14 KB."""
    parts = []
    for _, series in frame.groupby("series", sort=False):
        older, room = len(series) - recent, most - recent
        if older > room:
            keep = sorted({round(i * (older - 1) / (room - 1)) for i in range(room)})
            series = pd.concat([series.iloc[:older].iloc[keep], series.iloc[older:]])
        parts.append(series)
    return pd.concat(parts).sort_values("step", kind="stable") if parts else frame


def format_duration(seconds: float | None) -> str:
    """12s, 3m 05s, 1h 02m; '-' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def eta_seconds(events: list[dict], total_steps: int) -> float | None:
    """Remaining time from the pace between the first and the last train report (loading excluded)."""
    train = [e for e in events if e["event"] == "train"]
    if len(train) < 2 or not total_steps:
        return None
    first, last = train[0], train[-1]
    steps, seconds = last["step"] - first["step"], last["time"] - first["time"]
    if steps <= 0 or seconds <= 0:
        return None
    return max(total_steps - last["step"], 0) * seconds / steps


def last_train(events: list[dict]) -> dict:
    return next((e for e in reversed(events) if e["event"] == "train"), {})


def progress_html(state: runs.RunState, events: list[dict]) -> str:
    """A progress bar with step, percentage, status and ETA."""
    total = state.total_steps or 0
    share = min(state.step / total, 1.0) if total else 0.0
    eta = eta_seconds(events, total) if state.active else None
    label = f"{html.escape(state.name)} · {state.status} · step {state.step}/{total} · {share:.0%}"
    if state.active:
        label += f" · ETA {format_duration(eta)}"
    return (f'<div class="lora-progress" data-status="{state.status}"><div class="lora-progress-bar" '
            f'style="width:{share * 100:.1f}%"></div><span>{label}</span></div>')


def stats_markdown(state: runs.RunState, events: list[dict]) -> str:
    """Learning rate, tokens/s, peak memory, losses, best validation, the last message."""
    t = last_train(events)
    first = next((e for e in events if e["event"] == "first_step"), None)
    peak = t.get("peak_memory_gb")
    parts = [
        f"**train loss** {fmt(state.train_loss, '.4f')}",
        f"**valid loss** {fmt(state.val_loss, '.4f')}",
        f"**best** {fmt(state.best_val_loss, '.4f')}"
        + (f" @ {state.best_step}" if state.best_step is not None else ""),  # step 0: a starting adapter
        f"**learning rate** {fmt(t.get('learning_rate'), '.2e')}",
        f"**grad norm** {fmt(t.get('grad_norm'), '.3g')}",
        f"**tokens/s** {fmt(t.get('tokens_per_second'), ',.0f')}",
        f"**peak memory** {'-' if peak is None else human_bytes(peak * 1e9)}",  # MB for a small model's few MB
        f"**tokens trained** {fmt(t.get('trained_tokens'), ',')}",
    ]
    val = next((e for e in reversed(events) if e["event"] == "val"), {})
    for name, source in (("reward margin", "reward_margin"), ("reward accuracy", "reward_accuracy")):
        if t.get(source) is not None or val.get(source) is not None:
            parts.append(f"**{name}** {fmt(t.get(source), '.3f')} train · {fmt(val.get(source), '.3f')} valid")
    if first:
        parts.append(f"**first step** {first['seconds']:.1f}s (load + compile)")
    processes = processes_line(events)
    if processes:
        parts.insert(0, processes)
    text = " · ".join(parts)
    if state.message:
        text += f"\n\n{state.status}: {state.message}"
    return text


def processes_line(events: list[dict]) -> str:
    """'**2 processes**: mac-a, mac-b ×2' from the latest `running` status (data-parallel runs only)."""
    running = next((e for e in reversed(events) if e["event"] == "status" and e.get("status") == "running"), {})
    size, hosts = running.get("world_size") or 1, running.get("hosts") or []
    if size < 2:
        return ""
    counts: dict[str, int] = {}
    for host in hosts:
        counts[host] = counts.get(host, 0) + 1
    where = ", ".join(html.escape(h) + (f" ×{n}" if n > 1 else "") for h, n in counts.items())
    return f"**{size} processes**" + (f": {where}" if where else "")


def fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def samples_frame(events: list[dict]) -> pd.DataFrame:
    """The probe timeline: one row per evaluation step (step 0 = the base model), one column per prompt."""
    table: dict[int, dict[str, str]] = {}
    prompts: list[str] = []
    for e in events:
        if e["event"] != "sample":
            continue
        if e["prompt"] not in prompts:
            prompts.append(e["prompt"])
        table.setdefault(int(e["step"]), {})[e["prompt"]] = e["answer"]
    rows = [[("base" if step == 0 else str(step))] + [answers.get(p, "") for p in prompts]
            for step, answers in sorted(table.items())]
    return pd.DataFrame(rows, columns=["step"] + prompts)


def log_tail(run_dir: Path, lines: int = 12, max_bytes: int = 16384) -> str:
    """The last lines of train.log (read from the end, so a long log costs nothing)."""
    path = Path(run_dir) / "train.log"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


class EventCache:
    """Per run folder: an EventReader and the events read so far, shared by every session (the folder is
    the truth; this only avoids re-reading it on each poll)."""

    def __init__(self) -> None:
        self.lock = Lock()
        self.readers: dict[Path, tuple[runs.EventReader, list[dict]]] = {}

    def events(self, run_dir: Path) -> list[dict]:
        run_dir = Path(run_dir).resolve()
        with self.lock:
            reader, events = self.readers.setdefault(run_dir, (runs.EventReader(run_dir), []))
            if not reader.path.exists() and events:  # the folder was replaced: start over
                self.readers[run_dir] = reader, events = runs.EventReader(run_dir), []
            events.extend(reader.read_new())
            return list(events)
