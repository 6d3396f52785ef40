"""build_app(): the page. Each step lives in its own module; this file only lays out the tabs and wires
the events that cross steps (the model's info feeds the Adapter step, the form feeds Train, ...)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import adapter_step, data_step, model_step, runs_step, save_step, test_step, train_step
from .context import Context
from .runlist import adapter_choices, runs_frame
from .settings import FORM_KEYS

CSS_PATH = Path(__file__).resolve().parent.parent.parent / "assets" / "app.css"


def build_app(runs_dir: str | Path = "runs", models_dir: str | Path | None = None) -> gr.Blocks:
    ctx = Context(Path(runs_dir).resolve(), Path(models_dir).expanduser() if models_dir else None)
    with gr.Blocks(title="LoRA studio") as demo:
        gr.Markdown("# LoRA studio\nFine-tune a language model with LoRA on this machine (MLX). "
                    "Work through the steps left to right; training runs in its own process.")
        info = gr.State({})
        with gr.Tabs():
            with gr.Tab("1 · Model"):
                m = model_step.build(ctx)
            with gr.Tab("2 · Adapter"):
                a = adapter_step.build()
            with gr.Tab("3 · Data"):
                d = data_step.build()
            with gr.Tab("4 · Train", id="train"):
                t = train_step.build()
            with gr.Tab("5 · Test", id="test") as test_tab:
                p = test_step.build(ctx)
            with gr.Tab("6 · Save / load"):
                s = save_step.build(ctx)
            with gr.Tab("Runs"):
                r = runs_step.build_runs(ctx)
            with gr.Tab("Compare"):
                c = runs_step.build_compare(ctx)
        parts = {**vars(m), **vars(a), **vars(d), **vars(t)}
        form = {k: parts[k] for k in FORM_KEYS}  # the settings' widgets by config name
        wire(ctx, demo, m, a, d, t, p, s, r, c, info, form)
        demo.load(lambda: train_step.initial_run(ctx), None, t.current, api_name="attach")
        test_tab.select(test_step.worker_status, None, p.status, api_name="chat_status", show_progress="hidden")
    return demo


def wire(ctx, demo, m, a, d, t, p, s, r, c, info, form: dict) -> None:
    """Events between steps."""
    gr.on([m.inspect.click, m.model.submit], model_step.inspect_model, m.model, [info, m.info_md],
          api_name="inspect").then(model_step.backend_markdown, None, m.backend_md, api_name="backend")
    info.change(adapter_step.on_info, [info, a.layers, a.modules], [a.first, a.last, a.modules],
                api_name="adapter_choices")
    adapter_step.wire(a, info, [t.batch_size, t.max_seq_length, t.grad_checkpoint, d.longest])
    preview_in = [m.model, d.data, d.data_format, d.valid_fraction, d.mask_prompt, d.skip_bad_rows, t.max_seq_length,
                  t.batch_size, t.probe_prompts, t.objective]  # the objective: pairs as it trains them
    preview_out = [d.rows, d.stats, t.probe_prompts, d.longest]
    d.preview.click(data_step.preview_with_longest, preview_in, preview_out, api_name="preview_data")
    t.objective.change(data_step.refresh_preview, [d.rows, *preview_in], preview_out, api_name="refresh_preview")
    train_step.wire(ctx, t, form, info)
    model_step.wire(ctx, m, demo, [a.rank, a.modules, a.layers, t.batch_size, t.max_seq_length, t.grad_checkpoint,
                                   d.longest, a.method])
    m.model.change(lambda x: x, m.model, p.model, api_name="sync_test_model", show_progress="hidden")
    choices = lambda: gr.update(choices=adapter_choices(ctx.runs_dir))  # noqa: E731
    p.refresh.click(choices, None, p.adapter, api_name="refresh_test_adapters")
    s.use.click(lambda x: gr.update(choices=adapter_choices(ctx.runs_dir), value=x), s.adapter, p.adapter,
                api_name="test_adapter")
    s.load.click(save_step.settings_from_adapter, [s.adapter, info],
                 [a.rank, a.alpha, a.dropout, a.modules, a.layers, m.model, t.init_adapter],
                 api_name="load_adapter_settings")
    runs_step.wire(ctx, r, c, t.current)
    # A finished run shows up in the lists without a manual refresh.
    t.current.change(lambda: (runs_frame(ctx.runs_dir), *[gr.update(choices=adapter_choices(ctx.runs_dir))] * 2),
                     None, [r.table, s.adapter, p.adapter], api_name="runs_changed", show_progress="hidden")
