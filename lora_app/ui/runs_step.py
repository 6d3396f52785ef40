"""Runs: the list of past runs (name, date, model, rank/alpha/targets, losses, adapters), open one in the
Train step, export its settings as YAML; and Compare: overlaid curves and the settings that differ."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .. import runs
from ..config import ConfigError, RunConfig
from .context import Context
from .runlist import compare_frame, config_diff, curve_points, runs_frame
from .settings import export_yaml
from .timeline import METRICS
from .train_step import CACHE


def run_names(ctx: Context) -> list[str]:
    return [s.name for s in runs.list_runs(ctx.runs_dir)]


def refresh(ctx: Context) -> tuple:
    names = run_names(ctx)
    return runs_frame(ctx.runs_dir), gr.update(choices=names), gr.update(choices=names)


def open_run(ctx: Context, name: str | None) -> tuple[str, str]:
    try:
        runs.resolve_run(ctx.runs_dir, name or "")
    except runs.RunError as e:
        gr.Warning(f"Open: {e}; choose a run from the list.")
        return gr.skip(), f"⚠️ {e}"
    return name, f"Opened **{name}**: its curve is in the Train step."


def export_run_yaml(ctx: Context, name: str | None) -> str | None:
    try:
        run_dir = runs.resolve_run(ctx.runs_dir, name or "")
        text = export_yaml(RunConfig.from_flat(runs.read_config(run_dir)))
    except runs.RunError as e:
        gr.Warning(f"Export YAML: {e}")
        return None
    except ConfigError as e:
        gr.Warning(f"Export YAML of {name}: {e}")
        return None
    path = Path(tempfile.mkdtemp(prefix="lora_app_")) / f"{run_dir.name}.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def compare(ctx: Context, names: list[str] | None, x: str, log_scale: bool, smoothing: float,
            metric: str = "loss") -> tuple:
    try:
        folders = {n: runs.resolve_run(ctx.runs_dir, n) for n in dict.fromkeys(names or [])}
    except runs.RunError as e:
        gr.Warning(f"Compare: {e}")
        return gr.skip(), gr.skip(), None
    if len(folders) < 2:
        gr.Warning("Compare: choose at least two runs.")
        return gr.skip(), gr.skip(), None
    metric = metric if metric in METRICS else "loss"
    curves = {n: curve_points(CACHE.events(folder), metric) for n, folder in folders.items()}
    frame = compare_frame(curves, "tokens" if x == "tokens seen" else "step", log_scale, smoothing)
    diff = config_diff({n: runs.read_config(folder) for n, folder in folders.items()})
    label = METRICS.get(metric, "loss").lower()
    y = f"log10 {label}" if log_scale else label
    legend = sorted(set(frame["curve"]))
    return gr.update(value=frame, x=frame.columns[0], y_title=y, colors_in_legend=legend), diff, frame


def build_runs(ctx: Context) -> SimpleNamespace:
    table = gr.Dataframe(runs_frame(ctx.runs_dir), interactive=False, label="Runs (newest first)",
                         elem_id="runs-table")
    with gr.Row():
        pick = gr.Dropdown(run_names(ctx), value=None, allow_custom_value=True, label="Run", scale=2)
        refresh_btn = gr.Button("↻ Refresh", scale=0)
        open_btn = gr.Button("Open in Train", variant="primary", scale=0)
        yaml_btn = gr.Button("Export its YAML", scale=0)
    status = gr.Markdown("")
    yaml_file = gr.File(label="YAML (mlx_lm.lora --config / python -m lora_app train --config)", interactive=False)
    yaml_btn.click(lambda n: export_run_yaml(ctx, n), pick, yaml_file, api_name="export_run_yaml")
    return SimpleNamespace(table=table, pick=pick, refresh=refresh_btn, open=open_btn, status=status)


def build_compare(ctx: Context) -> SimpleNamespace:
    with gr.Row():
        pick = gr.Dropdown(run_names(ctx), multiselect=True, allow_custom_value=True,
                           label="Runs to compare (2 or more)", scale=3)
        x = gr.Radio(["step", "tokens seen"], value="step", label="Align by")
        log_scale = gr.Checkbox(False, label="Log scale")
        smoothing = gr.Slider(0, 0.95, value=0, step=0.05, label="Smoothing")
        metric = gr.Dropdown([("Loss", "loss")] + [(title, m) for m, title in METRICS.items()], value="loss",
                             label="Chart", elem_id="compare-metric")
    go = gr.Button("Compare", variant="primary")
    plot = gr.LinePlot(compare_frame({}), x="step", y="loss", color="curve", title="Loss", height=360,
                       elem_id="compare-plot")
    diff = gr.Dataframe(label="Settings that differ", interactive=False)
    drawn = gr.State(None)
    # Two updates: Gradio 6.31's LinePlot rebuilds its chart when a prop changes (the x column, the y title, the
    # curves in the legend) but draws the rebuilt chart from its previous value, so the frame is sent once more,
    # alone, once the rebuild is asked for.
    go.click(lambda *a: compare(ctx, *a), [pick, x, log_scale, smoothing, metric], [plot, diff, drawn],
             api_name="compare").then(lambda frame: frame if frame is not None else gr.skip(), drawn, plot,
                                      api_name=False, show_progress="hidden")
    return SimpleNamespace(pick=pick)


def wire(ctx: Context, r: SimpleNamespace, c: SimpleNamespace, current: gr.State) -> None:
    r.refresh.click(lambda: refresh(ctx), None, [r.table, r.pick, c.pick], api_name="refresh_runs")
    r.open.click(lambda n: open_run(ctx, n), r.pick, [current, r.status], api_name="open_run")
