"""Step 2, Adapter: block range × the model's real linear modules, rank / alpha (scale shown), dropout,
and live trainable parameters, adapter size and memory estimate."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..config import ConfigError, LoraConfig
from . import form
from .estimates import adapter_summary
from .settings import layers_from_range, module_choices, range_from_layers

# Until a model is inspected: the llama family's linear modules (most models on the hub use these names).
LLAMA_MODULES = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                 "self_attn.q_proj", "self_attn.v_proj"]


def scale_text(rank: float | None, alpha: float | None) -> str:
    if not rank or rank < 1 or alpha is None or alpha <= 0:
        return "⚠️ rank must be ≥ 1 and alpha > 0"
    return f"scale = alpha / rank = **{alpha / rank:g}**"


def layers_text(first: float, last: float, info: dict) -> str:
    try:
        return layers_from_range(first, last, info.get("num_blocks", 0))
    except ConfigError as e:
        gr.Warning(str(e))
        return gr.skip()


def on_info(info: dict, layers: str, modules: list[str]) -> tuple:
    """A newly inspected model: sliders span its blocks; checkboxes are its linear modules."""
    if not info:
        return gr.skip(), gr.skip(), gr.skip()
    n = info["num_blocks"]
    first, last = range_from_layers(layers, n)
    available = info["linear_modules"]
    keep = [m for m in module_choices(modules or [], available) if m in available]
    keep = keep or [m for m in module_choices(LoraConfig().modules, available) if m in available] or available[:1]
    return (gr.update(maximum=max(n - 1, 0), value=first), gr.update(maximum=max(n - 1, 0), value=last),
            gr.update(choices=available, value=keep))


def build() -> SimpleNamespace:
    gr.Markdown("Which layers get LoRA: a range of blocks × the linear modules inside each block.")
    with gr.Row():
        first = gr.Slider(0, 31, value=0, step=1, label="First block", elem_id="block-first")
        last = gr.Slider(0, 31, value=31, step=1, label="Last block", elem_id="block-last")
        layers = form.widget("layers", info=None, elem_id="layers")
    modules = gr.CheckboxGroup(LLAMA_MODULES, **form.props("modules", info=None, elem_id="modules"))
    with gr.Row():
        method = form.widget("method", elem_id="method")
        rank = form.widget("rank", elem_id="rank")
        alpha = form.widget("alpha", elem_id="alpha")
        dropout = form.slider("dropout", 0.05)
        scale = gr.Markdown(scale_text(rank.value, alpha.value), elem_id="scale")
    summary = gr.Markdown("Inspect the model (step 1) to see trainable parameters and sizes.",
                          elem_id="adapter-summary")
    rank.change(scale_text, [rank, alpha], scale, api_name="scale", show_progress="hidden")
    alpha.change(scale_text, [rank, alpha], scale, api_name="scale_alpha", show_progress="hidden")
    return SimpleNamespace(first=first, last=last, layers=layers, modules=modules, method=method, rank=rank,
                           alpha=alpha, dropout=dropout, scale=scale, summary=summary)


def wire(ui: SimpleNamespace, info: gr.State, train_inputs: list) -> None:
    """Events that need the inspected model's info; train_inputs (batch size, max sequence length, gradient
    checkpointing from the Train step, and the Data step's longest row) feed the memory estimate."""
    for slider in (ui.first, ui.last):
        slider.release(layers_text, [ui.first, ui.last, info], ui.layers, api_name=f"layers_{slider.elem_id[6:]}")
    ui.layers.input(sliders_from_layers, [ui.layers, info], [ui.first, ui.last], api_name="layers_typed",
                    show_progress="hidden")
    gr.on([ui.layers.change, ui.modules.change, ui.rank.change, ui.method.change, info.change,
           *(x.change for x in train_inputs)],
          lambda i, la, m, r, method, *t: adapter_summary(i, la, m or [], r or 1, *t, method=method),
          [info, ui.layers, ui.modules, ui.rank, ui.method, *train_inputs], ui.summary, api_name="adapter_summary",
          show_progress="hidden")


def sliders_from_layers(layers: str, info: dict) -> tuple:
    """Typed or imported specs move the sliders (a list like 0,2,5 leaves them where they are)."""
    if not info:
        return gr.skip(), gr.skip()
    first, last = range_from_layers(layers, info["num_blocks"])
    return first, last
