"""Step 4, Train: hyper-parameters, Start / Stop / Pause / Resume, and the live view of the run folder
(loss plot, progress with ETA, stats, sample-probe timeline, log), pushed to the page as the run folder changes."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from .. import runs
from ..config import ConfigError, RunConfig, save_config_json
from . import launch, timeline
from .chat_worker import WORKERS, training_reason
from .context import Context, warned
from .form import widget
from .loss_plot import HOVER_JS, loss_svg, metric_svg
from .settings import FORM_KEYS, command_preview, export_yaml, form_to_config, import_yaml

CACHE = timeline.EventCache()
# follow(): how often it looks at the shown run's folder (a few stat calls); how long it waits after an update (a
# GPU run may report several times a second: the page then redraws about once a second, ~20 ms of chromium CPU
# each on a 2-core machine, not once a report; a report waits at most ~0.9 s plus the redraw, under the 2 s the
# page promises even on a loaded CI machine); how often it answers "no change" (gradio ends the stream of a page
# gone only then); and each page session's newest follow() (an older one of it ends).
FOLLOW_CHECK_S, FOLLOW_GAP_S, FOLLOW_BEAT_S = 0.1, 0.8, 10.0
FOLLOWING: dict[str | None, object] = {}
PLOT_POINTS = 200  # per series in the live loss plot: each is redrawn on every update (timeline.thin)
ONE_RUN = "One run at a time: {name} is still training. Stop or pause it first."
STARTING = threading.Lock()  # held from the "no run is active" check until the new process holds its run's lock
# The launch choice's names in start() and in the /start API, after the form's (hostfile: the upload's path).
LAUNCH_KEYS = ("mode", "nproc", "hostfile", "hosts")


# ---- handlers ------------------------------------------------------------------------------------------

def start(ctx: Context, name: str, mode: str = launch.MODES[0], nproc: float = 2, hostfile: str | None = None,
          hosts: str = "", **form_values: Any) -> tuple[str, str]:
    """Write the run folder and start its training process; refused while another run is active.
    `form_values`: the form by config name; the rest is the launch choice."""
    try:
        config = form_to_config(form_values)
    except ConfigError as e:
        return gr.skip(), warned(f"Settings: {e}")
    try:
        choice = launch.check_launch(mode, nproc, hostfile, hosts, config.train.batch_size)
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in (name or "").strip()).strip(".")
        safe = runs.check_run_name(safe) if safe else None
    except (ConfigError, runs.RunError) as e:
        return gr.skip(), warned(str(e))
    with STARTING:  # the check and the start as one: three Starts at once start one run
        active = runs.active_run(ctx.runs_dir)
        if active:
            return gr.skip(), warned(ONE_RUN.format(name=active.name))
        run_dir = runs.new_run_dir(ctx.runs_dir, safe)
        save_config_json(config, run_dir / "config.json")
        WORKERS.release(training_reason(run_dir.name))  # training always wins the memory (chat_worker.py)
        runs.start_training(run_dir, extra=launch.save_launch(run_dir, choice))
    where = f" on {choice.world_size} processes" if choice.world_size > 1 else ""
    return run_dir.name, f"Started **{run_dir.name}**{where} (folder `{run_dir}`)."


def control_run(ctx: Context, current: str, action: str) -> str:
    try:
        state = runs.run_state(runs.resolve_run(ctx.runs_dir, current)) if current else None
    except runs.RunError as e:
        return warned(str(e))
    if state is None or not state.active:
        return warned(f"No run is training now; nothing to {action}.")
    runs.request(state.path, action)
    return f"{action.capitalize()} requested for **{state.name}**; it saves the adapter and ends at the next step."


def resume_run(ctx: Context, current: str) -> tuple[str, str]:
    """Start the shown run's training process again from its newest checkpoint, launched as it was started.
    What can be checked here is, so that a refusal shows on the page and not only in train.log."""
    try:
        run_dir = runs.resolve_run(ctx.runs_dir, current) if current else None
    except runs.RunError as e:
        return gr.skip(), warned(f"Resume: {e}")
    if run_dir is None or not (run_dir / "config.json").is_file():
        return gr.skip(), warned("Resume: open a run first (Runs tab).")
    try:
        RunConfig.from_flat(runs.read_config(run_dir))
    except ConfigError as e:
        return gr.skip(), warned(f"Resume {current}: its config.json cannot be used ({e})")
    with STARTING:
        active = runs.active_run(ctx.runs_dir)
        if active:
            return gr.skip(), warned(ONE_RUN.format(name=active.name))
        if runs.run_state(run_dir).status == "done":
            return gr.skip(), warned(f"Resume: {current} is finished; raise Iterations and start a new run instead.")
        WORKERS.release(training_reason(current))
        try:
            runs.start_training(run_dir, resume=True, extra=launch.launch_args(run_dir))  # as it was started
        except runs.RunError as e:
            return gr.skip(), warned(f"Resume: {e}")
    return current, f"Resuming **{current}** from its newest checkpoint."


def initial_run(ctx: Context) -> str:
    """On page load: the active run, else the newest one, so a reload re-attaches."""
    active = runs.active_run(ctx.runs_dir)
    if active:
        return active.name
    found = runs.list_runs(ctx.runs_dir)
    return found[0].name if found else ""


def nothing_new(seen: list | None) -> tuple:
    """The live outputs' answer when none of them changed: each skipped, the version shown kept."""
    return (gr.skip(),) * 6 + (seen,)


def poll(ctx: Context, current: str, seen: list | None) -> tuple:
    """Everything the live view shows, from the run folder, and the version shown; skipped when nothing changed.
    The sample table is skipped too while its probes are the ones shown: the page redraws a table on each update,
    15-20 ms of its CPU a second while a run reports (bench/page_cpu.py)."""
    try:
        run_dir = runs.resolve_run(ctx.runs_dir, current)
    except runs.RunError:
        return nothing_new(seen)
    events = CACHE.events(run_dir)
    state = runs.run_state(run_dir, events)
    log = timeline.log_tail(run_dir)
    samples = sum(e["event"] == "sample" for e in events)
    version = [current, len(events), state.status, state.alive, len(log), samples]
    if seen == version:
        return nothing_new(seen)
    same_samples = seen is not None and seen[0] == current and seen[-1] == samples
    curve = timeline.thin(timeline.loss_frame(events), PLOT_POINTS)
    return (timeline.progress_html(state, events), timeline.stats_markdown(state, events),
            loss_svg(curve) + metric_plots(events),
            gr.skip() if same_samples else timeline.samples_frame(events),
            log, f"Showing **{current}** · {state.status}", version)


def metric_plots(events: list[dict]) -> str:
    """The charts beyond loss under the loss plot, two a row: learning rate, gradient norm and, for preference
    runs, reward margin and accuracy (timeline.METRICS)."""
    plots = "".join(metric_svg(frame, metric, timeline.METRICS[metric])
                    for metric, frame in timeline.metric_frames(events, PLOT_POINTS).items())
    return f'<div class="metric-plots" style="display:grid;grid-template-columns:1fr 1fr">{plots}</div>'


def folder_mark(run_dir: Path) -> tuple:
    """Changes whenever what poll() shows may have: the size and time of the files it reads, the process alive.
    A few stat calls, so follow() can look often."""
    marks = []
    for name in ("events.jsonl", "train.log", "config.json"):
        try:
            st = (run_dir / name).stat()
            marks.append((st.st_size, st.st_mtime_ns))
        except OSError:
            marks.append(None)
    return (*marks, runs.pid_alive(runs.read_pid(run_dir)) or runs.is_locked(run_dir))


def shown(ctx: Context, current: str, seen: list | None) -> tuple:
    """poll(), or if it fails a warning in place of the "Showing" line and a `seen` of None, so that the stream
    goes on and the next change redraws everything: one bad read must not end a page's live view."""
    try:
        return poll(ctx, current, seen)
    except Exception as e:  # noqa: BLE001 - whatever it is, the message names it and the run
        return (gr.skip(),) * 5 + (f"⚠️ Showing **{current}**: could not read its folder ({e}); "
                                   "trying again at its next change.", None)


async def follow(ctx: Context, current: str, seen: list | None, session: str | None = None):
    """The live view, pushed: poll()'s answer each time the shown run's folder changes (at most once a
    FOLLOW_GAP_S), and nothing in between but a "no change" every FOLLOW_BEAT_S. Ends when the page goes away
    or shows another run (a newer follow() of the same session). The page used to poll once a second (a
    gr.Timer): each poll cost the server ~18 ms of gradio's request handling and the page ~20 ms, with nothing
    new too, CPU taken from a training run on a CPU-only machine (bench/ui_overhead.py). Looking at an unchanged
    folder here costs a few stat calls."""
    try:
        run_dir = runs.resolve_run(ctx.runs_dir, current)
    except runs.RunError:
        return
    me = FOLLOWING[session] = object()
    try:
        mark, said = object(), time.monotonic()  # mark: the folder as last looked at (not yet)
        while FOLLOWING.get(session) is me:
            now = folder_mark(run_dir)
            if now != mark:
                mark, out = now, shown(ctx, current, seen)
                # poll() answers the `seen` it was given when nothing shown changed; None: a failed read's warning
                if out[-1] is not seen or out[-1] is None:
                    seen, said = out[-1], time.monotonic()
                    yield out
                    await asyncio.sleep(FOLLOW_GAP_S)
            if time.monotonic() - said >= FOLLOW_BEAT_S:
                said = time.monotonic()
                yield nothing_new(seen)
            await asyncio.sleep(FOLLOW_CHECK_S)
    finally:
        if FOLLOWING.get(session) is me:
            del FOLLOWING[session]


def launch_fields(mode: str) -> tuple:
    """Show the field that goes with the chosen way to run."""
    return (gr.update(visible=mode == launch.MODES[1]), gr.update(visible=mode == launch.MODES[2]),
            gr.update(visible=mode == launch.MODES[3]))


def preview_command(mode: str = launch.MODES[0], nproc: float = 2, **form_values: Any) -> str:
    """The equivalent command of the form (by config name) and the launch choice."""
    try:
        return command_preview(form_to_config(form_values), extra=launch.preview_args(mode, nproc))
    except ConfigError as e:
        return f"# settings not valid yet: {e}"


def export_settings(**form_values: Any) -> str | None:
    try:
        text = export_yaml(form_to_config(form_values))
    except ConfigError as e:
        gr.Warning(f"Export YAML: {e}")
        return None
    path = Path(tempfile.mkdtemp(prefix="lora_app_")) / "lora_config.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def import_settings(path: str | None, info: dict) -> list:
    """The form's values from an uploaded YAML, in FORM_KEYS order (the order of the event's outputs)."""
    if not path:
        return [gr.skip()] * len(FORM_KEYS)
    try:
        values = import_yaml(path, (info or {}).get("linear_modules"))
    except ConfigError as e:
        gr.Warning(f"Import YAML: {e}")
        return [gr.skip()] * len(FORM_KEYS)
    extra = sorted(set(values["modules"]) - set((info or {}).get("linear_modules", values["modules"])))
    if extra:
        gr.Warning(f"Import YAML: module(s) {', '.join(extra)} are not in the inspected model")
    gr.Info(f"Imported the settings from {Path(path).name}")
    return [gr.update(value=values[k], choices=sorted(set(values["modules"]) | set((info or {}).get(
        "linear_modules", [])))) if k == "modules" else values[k] for k in FORM_KEYS]


# ---- layout ----------------------------------------------------------------------------------------------

# The Train step's settings, row by row; the elem_ids the browser tests fill in.
HYPER_ROWS = (
    ("iters", "epochs", "batch_size", "learning_rate", "warmup", "lr_schedule"),
    ("optimizer", "weight_decay", "grad_clip", "max_seq_length", "batching", "memory_limit_gb"),
    ("steps_per_report", "steps_per_eval", "val_batches", "save_every", "keep_checkpoints", "seed"),
    ("grad_checkpoint", "grad_accumulation", "early_stop_patience", "early_stop_min_delta", "probe_max_tokens"),
    ("objective", "beta", "orpo_lambda", "report_to"),
)
ELEM_IDS = {"iters": "iters", "learning_rate": "learning-rate", "steps_per_report": "steps-per-report",
            "objective": "objective"}


def build() -> SimpleNamespace:
    c = SimpleNamespace()
    with gr.Accordion("Hyper-parameters", open=True):
        for row in HYPER_ROWS:
            with gr.Row():
                for name in row:
                    setattr(c, name, widget(name, elem_id=ELEM_IDS.get(name)))
        c.probe_prompts = widget("probe_prompts", lines=3, info=None)
        c.init_adapter = widget("init_adapter", elem_id="init-adapter",
                                placeholder="an adapter folder (ours, mlx_lm.lora's or PEFT); its rank, modules and "
                                "blocks must match step 2. Step 6's 'Continue training it' fills this in.")
    with gr.Accordion("Several processes or machines (data-parallel)", open=False):
        gr.Markdown("Each process takes an equal share of every batch and the gradients are averaged "
                    "(`mlx.launch`). Only the first host writes the run folder, so list this machine first "
                    "(`127.0.0.1` or its address). Other machines need ssh without a password and this project, "
                    "the model and the data at the same paths (README: Several machines).")
        with gr.Row():
            c.launch_mode = gr.Radio(list(launch.MODES), value=launch.MODES[0], label="Run on",
                                     elem_id="launch-mode", scale=2)
            c.nproc = gr.Number(2, precision=0, label="Processes on this machine", visible=False,
                                elem_id="nproc")
        c.hostfile = gr.File(label="mlx.launch hostfile (JSON)", file_types=[".json"], type="filepath",
                             visible=False, elem_id="hostfile")
        c.hosts = gr.Textbox("", lines=3, label="Hosts, one per line (mac1.local or user@10.0.0.2); this "
                             "machine first", visible=False, elem_id="hosts")
        c.hostfile_path = gr.State(None)  # Start reads the upload from here: a File input has no API default
    with gr.Row():
        c.run_name = gr.Textbox("", label="Run name (optional)", scale=2)
        c.start = gr.Button("Start", variant="primary", elem_id="start", scale=1)
        c.pause = gr.Button("Pause", elem_id="pause", scale=1)
        c.resume = gr.Button("Resume", elem_id="resume", scale=1)
        c.stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
    c.message = gr.Markdown("One run at a time: Start is refused while another run is training.",
                            elem_id="train-message")
    c.showing = gr.Markdown("", elem_id="showing")
    c.progress = gr.HTML(elem_id="progress")
    c.stats = gr.Markdown("", elem_id="train-stats")
    c.plot = gr.HTML(loss_svg(timeline.loss_frame([])), js_on_load=HOVER_JS, elem_id="loss-plot")
    c.samples = gr.Dataframe(label="Sample probes (step × prompt; the first row is the base model)",
                             interactive=False, wrap=True, elem_id="samples")
    c.log = gr.Textbox(label="train.log (last lines)", lines=8, max_lines=12, interactive=False, elem_id="log")
    with gr.Accordion("Command line and YAML", open=False):
        c.command = gr.Code(label="Equivalent command", language="shell", interactive=False, elem_id="command")
        with gr.Row():
            c.import_file = gr.File(label="Import an mlx_lm.lora YAML config", file_types=[".yaml", ".yml", ".json"],
                                    type="filepath")
            c.export = gr.Button("Export these settings as YAML (mlx_lm.lora --config)")
            c.export_file = gr.File(label="YAML", interactive=False)
    c.current = gr.State("")
    c.seen = gr.State(None)
    return c


def wire(ctx: Context, c: SimpleNamespace, form: dict[str, gr.components.Component], info: gr.State) -> None:
    """`form`: the settings' widgets by config name (settings.FORM_KEYS, in that order: the APIs' order), which
    the handlers receive as keyword arguments of the same names."""
    launch_in = dict(zip(LAUNCH_KEYS, (c.launch_mode, c.nproc, c.hostfile_path, c.hosts), strict=True))
    c.start.click(lambda name, **named: start(ctx, name, **named), [c.run_name], [c.current, c.message],
                  inputs_kwargs={**form, **launch_in}, api_name="start")
    c.launch_mode.change(launch_fields, c.launch_mode, [c.nproc, c.hostfile, c.hosts], api_name="launch_mode",
                         show_progress="hidden")
    c.hostfile.change(lambda path: path, c.hostfile, c.hostfile_path, api_name="hostfile", show_progress="hidden")
    c.stop.click(lambda cur: control_run(ctx, cur, "stop"), c.current, c.message, api_name="stop")
    c.pause.click(lambda cur: control_run(ctx, cur, "pause"), c.current, c.message, api_name="pause")
    c.resume.click(lambda cur: resume_run(ctx, cur), c.current, [c.current, c.message], api_name="resume")
    live = [c.progress, c.stats, c.plot, c.samples, c.log, c.showing, c.seen]

    async def follow_shown(cur: str, seen: list | None, request: gr.Request):
        async for out in follow(ctx, cur, seen, request.session_hash if request else None):
            yield out

    # The page shows a run (Start, Resume, opening a run, or the page's load set c.current) through one streamed
    # event that lasts while it is shown: no requests while nothing changes. Streams need the queue; each
    # page's stream runs alongside the others' (no concurrency limit), and a new run shown starts its stream at
    # once ("multiple": with gradio's default for change, a trigger waits while the previous stream has sent
    # nothing yet, for good if it never does; follow() ends the page's older stream itself). The loading status
    # goes on c.seen, a State, which the page does not draw: by default gradio puts it on each output, even
    # with show_progress="hidden", and each status runs an animation loop while pending (~40 ms of chromium
    # CPU a second on a 2-core machine).
    c.current.change(follow_shown, [c.current, c.seen], live, api_name="follow", show_progress="hidden",
                     show_progress_on=c.seen, concurrency_limit=None, trigger_mode="multiple")
    # The same answer once, for scripts (gradio_client): an event with no trigger on the page.
    gr.on([], lambda cur, seen: poll(ctx, cur, seen), [c.current, c.seen], live, api_name="poll",
          show_progress="hidden", queue=False)
    gr.on([x.change for x in [*form.values(), c.launch_mode, c.nproc]], preview_command, None, c.command,
          inputs_kwargs={**form, "mode": c.launch_mode, "nproc": c.nproc}, api_name="command_preview",
          show_progress="hidden")
    c.export.click(export_settings, None, c.export_file, inputs_kwargs=form, api_name="export_settings_yaml")
    # The loading status on the upload, not on the 25 fields: gradio updates every component that has carried a
    # status again on each later request of the page, polls included (bench/ui_overhead.py --browser).
    c.import_file.upload(import_settings, [c.import_file, info], list(form.values()), api_name="import_yaml",
                         show_progress_on=c.import_file)
