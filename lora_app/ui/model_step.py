"""Step 1, Model: the demo model, a local folder, a found folder (HF cache / models folder) or a hub id;
inspected in a subprocess (architecture, blocks, params, quantization, dtype) plus the MLX backend."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from . import engine, form
from .context import Context
from .settings import DEQUANTIZE


def info_markdown(info: dict) -> str:
    quant = info.get("quantization")
    q = f"{quant['bits']}-bit (group size {quant['group_size']})" if quant else "none"
    return (f"**{info['architecture']}** · {info['num_blocks']} blocks · {info['total_params']:,} parameters · "
            f"hidden size {info['hidden_size']} · vocabulary {info['vocab_size']:,} · dtype {info['dtype']} · "
            f"quantization {q}\n\nLinear modules per block: {', '.join(info['linear_modules'])}\n\n"
            f"`{info['path']}`")


def inspect_model(model: str) -> tuple[dict, str]:
    model = (model or "").strip()
    if not model:
        gr.Warning("Model: empty; choose the demo model, a folder or a Hugging Face repo id.")
        return {}, "⚠️ Model: empty."
    try:
        info = engine.inspect(model)
    except engine.EngineError as e:
        gr.Warning(f"Model {model}: {e}")
        return {}, f"⚠️ Could not inspect `{model}`: {e}"
    return info, info_markdown(info)


def backend_markdown() -> str:
    mem = engine.memory_available_gb()
    mem_text = f"{mem:.1f} GB available" if mem is not None else "unknown"
    try:
        b = engine.backend()
    except engine.EngineError as e:
        return f"⚠️ MLX did not start: {e}"
    limit = b["info"].get("max_recommended_working_set_size") or b["info"].get("memory_size")
    extra = f" · device memory {limit / 1e9:.1f} GB" if limit else ""
    return f"**MLX backend** {b['backend']} (`{b['device']}`) · **system memory** {mem_text}{extra}"


def model_list(ctx: Context) -> list[str]:
    return ["demo"] + engine.find_models(ctx.models_dir)


def build(ctx: Context) -> SimpleNamespace:
    gr.Markdown("Choose the base model: the **demo** model works offline; or a local folder "
                "(Hugging Face / MLX layout), or a Hugging Face repo id such as `mlx-community/...`.")
    with gr.Row():
        found = gr.Dropdown(model_list(ctx), value="demo", label="Found models (demo, HF cache, models folder)",
                            scale=2)
        refresh = gr.Button("↻ Refresh list", scale=0)
    model = form.widget("model", info=None, elem_id="model-path")
    dequantize = gr.Radio(list(DEQUANTIZE), **form.props("dequantize"))
    inspect = gr.Button("Inspect model", variant="primary", elem_id="inspect-model")
    info_md = gr.Markdown("Not inspected yet.", elem_id="model-info")
    backend_md = gr.Markdown("", elem_id="backend-info")

    found.input(lambda m: m, found, model, api_name="pick_model")
    refresh.click(lambda: gr.update(choices=model_list(ctx)), None, found, api_name="refresh_models")
    return SimpleNamespace(model=model, dequantize=dequantize, inspect=inspect, info_md=info_md,
                           backend_md=backend_md, found=found)
