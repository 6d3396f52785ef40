"""Step 6, Save / load: copy an adapter (a run's latest or best, or any mlx-lm or PEFT adapter folder) to a folder
of the user's choice, export it as PEFT or fused (subprocess), test it, or load its settings into the form."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from ..adapters.export import ExportError, check_free
from ..adapters.reader import AdapterError, AdapterSettings, read_adapter
from . import engine
from .context import Context, warned
from .runlist import adapter_choices
from .settings import module_choices

KIND_NAMES = {"ours": "adapter", "mlx-lm": "mlx_lm.lora adapter", "peft": "PEFT adapter"}


def adapter_markdown(folder: str | None) -> str:
    if not folder:
        return "Choose an adapter."
    try:
        s = read_adapter(Path(folder).expanduser())
    except AdapterError as e:
        return f"⚠️ {e}"
    step = f" · step {s.step}" if s.step is not None else ""
    val = f" · valid loss {s.val_loss:.4f}" if isinstance(s.val_loss, (int, float)) else ""
    return (f"{KIND_NAMES[s.kind]} · rank {s.rank} · scale {s.scale:g} · dropout {s.dropout:g} · {where(s)} · "
            f"modules {', '.join(s.modules or ['all linear'])}{step}{val}\n\n"
            f"base model `{s.base_model or '?'}`")


def where(s: AdapterSettings) -> str:
    """The adapted blocks in words."""
    if s.layers == "all":
        return "all blocks"
    return f"last {s.layers[5:]} blocks" if s.layers.startswith("last:") else f"blocks {s.layers}"


def save_copy(folder: str | None, dest: str) -> str:
    """Copy the adapter folder; an existing non-empty destination is never overwritten."""
    try:
        read_adapter(Path(folder or "").expanduser())
    except AdapterError as e:
        gr.Warning(f"Save: {e}")
        return f"⚠️ {e}"
    if not str(dest or "").strip():
        return warned("Save: type a destination folder.")
    target = Path(dest.strip()).expanduser()
    try:
        check_free(target)
        shutil.copytree(Path(folder).expanduser(), target, dirs_exist_ok=True)
    except (ExportError, OSError) as e:
        return warned(f"Save: {e}")
    return f"Saved to `{target}`."


def export_adapter(folder: str | None, fmt: str, out: str, dequantize: bool) -> str:
    if not folder or not (out or "").strip():
        return warned("Export: choose an adapter and type an output folder.")
    target = Path(out.strip()).expanduser()
    try:
        check_free(target)  # here, before a subprocess loads MLX only to refuse it
        result = engine.export(folder, fmt, str(target), dequantize=dequantize)
    except (ExportError, engine.EngineError) as e:
        return warned(f"Export {fmt}: {e}")
    return f"{fmt}: {result}"


def settings_from_adapter(folder: str | None, info: dict | None = None) -> tuple:
    """rank, alpha, dropout, modules, layers, model from an adapter folder (ours, mlx_lm.lora's or PEFT's), and
    the folder itself as init_adapter, so the next run continues training the adapter's weights."""
    path = Path(folder or "").expanduser()
    try:
        s = read_adapter(path)
    except AdapterError as e:
        gr.Warning(f"Load settings: {e}")
        return (gr.skip(),) * 7
    available = (info or {}).get("linear_modules")
    modules = module_choices(s.modules, available) if s.modules else sorted(set(available or []))
    if not modules:  # mlx_lm.lora without keys adapts every linear module of a block
        gr.Warning("Load settings: the adapter adapts every linear module; inspect the model (step 1), "
                   "then tick them all in step 2")
    gr.Info(f"Loaded the {KIND_NAMES[s.kind]}'s settings and weights: rank {s.rank}, modules "
            f"{', '.join(modules) or 'all'}; the next run starts from it")
    return (s.rank, float(s.alpha), float(s.dropout), gr.update(value=modules) if modules else gr.skip(),
            s.layers, s.base_model or gr.skip(), str(path))


def build(ctx: Context) -> SimpleNamespace:
    gr.Markdown("Each run keeps its latest adapter (`adapters/`) and, with validation data, the best one (`best/`). "
                "You can also type the path of any adapter folder made by `mlx_lm.lora`.")
    with gr.Row():
        adapter = gr.Dropdown(adapter_choices(ctx.runs_dir), value=None, allow_custom_value=True,
                              label="Adapter", scale=3, elem_id="save-adapter")
        refresh = gr.Button("↻ Refresh", scale=0)
    about = gr.Markdown("Choose an adapter.")
    with gr.Row():
        use = gr.Button("Test it (step 5)")
        load = gr.Button("Continue training it: load its settings and weights into the form", elem_id="load-adapter")
    with gr.Row():
        dest = gr.Textbox(label="Save a copy to folder (same layout)", scale=3)
        save = gr.Button("Save", variant="primary", scale=0)
    with gr.Row():
        fmt = gr.Radio(["peft", "fused"], value="peft", label="Export as")
        out = gr.Textbox(label="Export to folder", scale=2)
        dequantize = gr.Checkbox(False, label="Fused: float weights")
        export = gr.Button("Export", scale=0)
    status = gr.Markdown("", elem_id="save-status")
    adapter.change(adapter_markdown, adapter, about, api_name="adapter_info")
    refresh.click(lambda: gr.update(choices=adapter_choices(ctx.runs_dir)), None, adapter,
                  api_name="refresh_adapters")
    save.click(save_copy, [adapter, dest], status, api_name="save_adapter")
    export.click(export_adapter, [adapter, fmt, out, dequantize], status, api_name="export_adapter")
    return SimpleNamespace(adapter=adapter, use=use, load=load, refresh=refresh)

