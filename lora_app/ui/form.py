"""The form's widgets, made from the config: each field's default, label, help text, choices and bounds come from
its metadata in lora_app/config.py, so the page shows `RunConfig()` and cannot drift from it
(tests/test_form_defaults.py). The steps' build() functions lay the widgets out; handlers get them by config name.

Every config field is on the page (settings.FORM_KEYS) except settings.CLI_ONLY, which the CLI and YAML files set:
- `columns`: a mapping of the data's column names to roles; the Data step reads files in the layouts it knows
  (text, completions, chat, instruction) and has no editor for a mapping.
- `hf_split`: only a Hugging Face dataset has splits, and the Data step's sources are the demo, a folder or a file.

Numbers show their allowed range in their info line but get no minimum or maximum: gradio enforces those itself,
before any handler, with a message of its own on every event the number feeds (the memory estimate, the command
preview), where RunConfig.validate names every bad setting in one line at Start. A slider needs a range: its
ends are the bound's, an open end moved in by one step so that the slider never offers a refused value.
"""

from __future__ import annotations

from dataclasses import Field, fields
from typing import Any

import gradio as gr

from ..config import BOUNDS, SECTIONS, RunConfig, field_help
from .settings import CHECKBOXES, config_to_form

FIELDS: dict[str, Field] = {f.name: f for section in SECTIONS for f in fields(section)}
SHOWN = config_to_form(RunConfig())  # each default as the form shows it (dequantize "auto", in-block module paths)
HELP = field_help()  # help text with the allowed range
# The label and info line of each settings.CHECKBOXES setting: its config label and help name the CLI's choices.
CHECKBOX_TEXT = {"report_to": ("Write TensorBoard event files", "The scalars (loss, learning rate, grad norm, ...) "
                               "also as TensorBoard event files in the run folder's tensorboard/: "
                               "tensorboard --logdir runs/")}


def props(name: str, **layout: Any) -> dict[str, Any]:
    """Value, label and info of config field `name`, then `layout` (elem_id, scale, lines, info=None where the
    label says it all): for widget() and for the steps' special widgets (the modules' checkboxes, ...)."""
    return {"value": SHOWN[name], "label": FIELDS[name].metadata["label"], "info": HELP[name], **layout}


def widget(name: str, **layout: Any) -> gr.components.Component:
    """The widget of config field `name`, from its type and metadata; `layout` as for props()."""
    f, kw = FIELDS[name], props(name, **layout)
    kind = str(f.type)
    if name in CHECKBOXES:
        label, info = CHECKBOX_TEXT[name]
        return gr.Checkbox(**{**kw, "label": label, "info": info})
    if "choices" in f.metadata:
        return gr.Dropdown(list(f.metadata["choices"]), **kw)
    if kind == "bool":
        return gr.Checkbox(**kw)
    if kind in ("int", "float"):
        return gr.Number(precision=0 if kind == "int" else None, **kw)
    if kind == "str" or kind.startswith("list"):  # a list is a text of lines (probe_prompts)
        return gr.Textbox(**kw)
    raise TypeError(f"{name}: no widget for a {kind} setting; build it in its step with props()")


def slider(name: str, step: float, **layout: Any) -> gr.Slider:
    """A slider over the bounds of config field `name`."""
    b = BOUNDS[name]
    return gr.Slider(b.low + step * b.low_open, b.high - step * b.high_open, step=step, **props(name, **layout))
