"""Step 5, Test: the same prompt through the base model and the adapter, side by side, streaming
(each through `python -m lora_app generate`, chat template applied)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import gradio as gr

from . import engine


def generate_pair(model: str, adapter: str | None, prompt: str, max_tokens: float, chat: bool) -> Iterator[tuple]:
    """Base first, then the adapter (two processes at once would halve the speed of each on a CPU)."""
    model, adapter, prompt = (model or "").strip(), (adapter or "").strip(), (prompt or "").strip()
    if not model or not prompt:
        gr.Warning("Test: choose a model and type a prompt.")
        yield "⚠️ choose a model and type a prompt", ""
        return
    base = with_adapter = ""
    for which in ("base", "adapter"):
        if which == "adapter" and not adapter:
            yield base, "(no adapter chosen)"
            return
        try:
            for text in engine.stream_generate(model, adapter if which == "adapter" else None, prompt,
                                               int(max_tokens or 128), chat):
                base, with_adapter = (text, with_adapter) if which == "base" else (base, text)
                yield base, with_adapter
        except engine.EngineError as e:
            gr.Warning(f"Generate ({which}): {e}")
            msg = f"⚠️ {e}"
            base, with_adapter = (msg, with_adapter) if which == "base" else (base, msg)
            yield base, with_adapter


def build() -> SimpleNamespace:
    gr.Markdown("The same prompt, with and without the adapter. The chat template is applied when the model has one.")
    with gr.Row():
        model = gr.Textbox("demo", label="Base model", scale=2)
        adapter = gr.Dropdown([], value=None, allow_custom_value=True, label="Adapter folder (runs, or any path)",
                              scale=2, elem_id="test-adapter")
        refresh = gr.Button("↻", scale=0)
    prompt = gr.Textbox("Write 3 March 2021 as YYYY-MM-DD.", label="Prompt", lines=2)
    with gr.Row():
        max_tokens = gr.Number(64, precision=0, label="Max tokens")
        chat = gr.Checkbox(True, label="Apply the chat template")
        go = gr.Button("Generate", variant="primary")
    with gr.Row():
        base = gr.Textbox(label="Base model", lines=8, interactive=False)
        tuned = gr.Textbox(label="With adapter", lines=8, interactive=False)
    go.click(generate_pair, [model, adapter, prompt, max_tokens, chat], [base, tuned], api_name="generate")
    return SimpleNamespace(model=model, adapter=adapter, refresh=refresh)
