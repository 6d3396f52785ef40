"""Past runs: list rows, adapter folders (adapters/ latest and best/), comparison curves and config diffs.

Engine-free: reads run folders through lora_app.runs only.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import runs
from ..config import field_defaults
from .timeline import fmt, loss_frame, metric_frame

RUN_COLUMNS = ["name", "date", "status", "model", "rank/alpha", "targets", "step", "train loss", "valid loss",
               "best (step)", "adapters"]


def short_model(model: str) -> str:
    return Path(model).name if "/" in model and Path(model).exists() else model


def run_row(state: runs.RunState) -> list:
    c = state.config
    started = state.started or state.path.stat().st_mtime
    best = f"{state.best_val_loss:.4f} ({state.best_step})" if state.best_val_loss is not None else "-"
    return [
        state.name, time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), state.status,
        short_model(str(c.get("model", "?"))), f"{c.get('rank', '?')}/{c.get('alpha', '?')}",
        f"{','.join(m.rsplit('.', 1)[-1] for m in c.get('modules', []))} @ {c.get('layers', '?')}",
        f"{state.step}/{state.total_steps}",
        fmt(state.train_loss, ".4f"), fmt(state.val_loss, ".4f"),
        best, " ".join(adapter_kinds(state.path)) or "-",
    ]


def runs_frame(runs_dir: Path) -> pd.DataFrame:
    return pd.DataFrame([run_row(s) for s in runs.list_runs(runs_dir)], columns=RUN_COLUMNS)


def adapter_kinds(run_dir: Path) -> list[str]:
    return [k for k in ("adapters", "best") if (Path(run_dir) / k / "adapters.safetensors").is_file()]


def adapter_choices(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, folder) for every saved adapter: each run's latest adapters/ and its best/ (with step, loss)."""
    out = []
    for state in runs.list_runs(runs_dir):
        for kind in adapter_kinds(state.path):
            if kind == "best":
                label = f"{state.name} · best (step {state.best_step}, valid {fmt(state.best_val_loss, '.4f')})"
            else:
                label = f"{state.name} · latest (step {state.step})"
            out.append((label, str(state.path / kind)))
    return out


# ---- comparison ------------------------------------------------------------------------------------------

def curve_points(events: list[dict], metric: str = "loss") -> pd.DataFrame:
    """step, tokens, loss, series for one run (last value per step); validation points get the tokens seen
    at their step, interpolated from the train reports. Another `metric` (timeline.METRICS) puts its values in
    the loss column."""
    frame = loss_frame(events) if metric == "loss" else metric_frame(events, metric)
    train = {int(e["step"]): e.get("trained_tokens", 0) for e in events if e["event"] == "train"}
    steps = sorted(train)
    if steps:
        frame["tokens"] = np.interp(frame["step"], steps, [train[s] for s in steps])
    else:
        frame["tokens"] = 0.0
    return frame


def smooth(values: pd.Series, weight: float) -> pd.Series:
    """TensorBoard-style exponential moving average (weight 0: off)."""
    if weight <= 0:
        return values
    return values.ewm(alpha=1 - min(weight, 0.99), adjust=False).mean()


def compare_frame(curves: dict[str, pd.DataFrame], x: str = "step", log_scale: bool = False,
                  smoothing: float = 0.0) -> pd.DataFrame:
    """One frame for an overlaid plot: x, loss, curve ('<run> train' / '<run> valid')."""
    parts = []
    for name, frame in curves.items():
        for series, part in frame.groupby("series", sort=False):
            part = part.sort_values("step")
            loss = smooth(part["loss"], smoothing)
            parts.append(pd.DataFrame({x: part[x].to_numpy(), "loss": loss.to_numpy(),
                                       "curve": f"{name} {series}"}))
    empty = pd.DataFrame({x: pd.Series(dtype="float64"), "loss": pd.Series(dtype="float64"),
                          "curve": pd.Series(dtype="str")})
    out = pd.concat(parts, ignore_index=True) if parts else empty
    if log_scale and len(out):
        out["loss"] = np.log10(out["loss"].clip(lower=1e-12))
    return out


def config_diff(configs: dict[str, dict]) -> pd.DataFrame:
    """The settings whose values differ between the runs: one row per setting, one column per run."""
    defaults = field_defaults()
    keys = sorted(set(defaults) | {k for c in configs.values() for k in c})
    rows = []
    for key in keys:
        values = [configs[name].get(key, defaults.get(key)) for name in configs]
        if len({repr(v) for v in values}) > 1:
            rows.append([key] + [display(v) for v in values])
    return pd.DataFrame(rows, columns=["setting"] + list(configs))


def display(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)
