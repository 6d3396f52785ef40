"""Step 6, Save / load: copy an adapter (a run's latest or best, or any mlx-lm adapter folder) to a folder of
the user's choice, export it as PEFT or fused (subprocess), test it, or load its settings into the form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from ..adapters import AdapterError, read_adapter_config
from ..export import ExportError, check_free
from ..peft_format import is_peft_folder, read_peft_config
from . import engine
from .context import Context, warned
from .runlist import adapter_choices
from .settings import module_choices


def adapter_markdown(folder: str | None) -> str:
    if not folder:
        return "Choose an adapter."
    try:
        config = read_adapter_config(Path(folder).expanduser())
    except AdapterError as e:
        return f"⚠️ {e}"
    p, ours = config["lora_parameters"], config.get("lora_app", {})
    where = f"blocks {ours['blocks']}" if ours else f"last {config.get('num_layers', '?')} blocks"
    step = f" · step {config['step']}" if "step" in config else ""
    val = f" · valid loss {config['val_loss']:.4f}" if "val_loss" in config else ""
    return (f"rank {p['rank']} · scale {p['scale']:g} · dropout {p.get('dropout', 0)} · {where} · "
            f"modules {', '.join(ours.get('modules') or p.get('keys') or ['all linear'])}{step}{val}\n\n"
            f"base model `{config.get('model') or ours.get('base_model', '?')}`")


def save_copy(folder: str | None, dest: str) -> str:
    """Copy the adapter folder; an existing non-empty destination is never overwritten."""
    try:
        read_adapter_config(Path(folder or "").expanduser())
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
    """rank, alpha, dropout, modules, layers, model from an adapter's config (ours or mlx_lm's), and the folder
    itself as init_adapter, so the next run continues training the adapter's weights."""
    path = Path(folder or "").expanduser()
    try:
        if is_peft_folder(path):
            return peft_settings(path, info)
        config = read_adapter_config(path)
    except AdapterError as e:
        gr.Warning(f"Load settings: {e}")
        return (gr.skip(),) * 7
    p, ours = config["lora_parameters"], config.get("lora_app") or {}
    rank = int(p["rank"])
    if ours:
        modules, layers = ours["modules"], ",".join(map(str, ours["blocks"]))
    else:
        modules = [k.split(".", 3)[-1] if k.startswith("model.layers.") else k for k in p.get("keys") or []]
        n = int(config.get("num_layers", -1))
        layers = "all" if n < 0 else f"last:{n}"
    if not modules:  # mlx_lm.lora without keys adapts every linear module of a block
        modules = list((info or {}).get("linear_modules") or [])
        if not modules:
            gr.Warning("Load settings: the adapter adapts every linear module; inspect the model (step 1), "
                       "then tick them all in step 2")
    model = config.get("model") or ours.get("base_model") or gr.skip()
    gr.Info(f"Loaded the adapter's settings and weights: rank {rank}, modules {', '.join(modules) or 'all'}; "
            "the next run starts from it")
    return (rank, float(ours.get("alpha", p["scale"] * rank)), float(p.get("dropout", 0.0)),
            gr.update(value=sorted(set(modules))) if modules else gr.skip(), layers, model, str(path))


def peft_settings(path: Path, info: dict | None) -> tuple:
    """settings_from_adapter for a PEFT folder, from its adapter_config.json (r, lora_alpha, target_modules,
    layers_to_transform); the trainer checks them against the tensors before step 1."""
    config = read_peft_config(path)
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(r): the same scale as ours needs alpha * sqrt(r)
        alpha *= rank ** 0.5
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    available = (info or {}).get("linear_modules")
    modules = [m for m in module_choices(targets, available) if not available or m in available]
    layers = config.get("layers_to_transform")
    layers = ",".join(map(str, [layers] if isinstance(layers, int) else layers)) if layers else "all"
    if not available:
        gr.Warning("Load settings: inspect the model (step 1) so the PEFT target modules can be ticked in step 2")
    gr.Info(f"Loaded the PEFT adapter's settings and weights: rank {rank}, modules {', '.join(targets)}; "
            "the next run starts from it")
    return (rank, alpha, float(config.get("lora_dropout", 0.0)),
            gr.update(value=sorted(set(modules))) if modules else gr.skip(), layers,
            config.get("base_model_name_or_path") or gr.skip(), str(path))


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
        dest = gr.Textbox(label="Save a copy to folder (mlx-lm layout)", scale=3)
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


def config_json(folder: str) -> str:
    return json.dumps(read_adapter_config(Path(folder)), indent=2)
