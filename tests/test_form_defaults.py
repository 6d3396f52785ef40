"""The page's form is the config: each setting's widget, as the built page holds it and as Start receives it, shows
`RunConfig()`'s default, the field's label, its choices and its bounds; every setting is on the page or CLI-only."""

from __future__ import annotations

from dataclasses import fields

import gradio as gr
import pytest

from lora_app.config import BOUNDS, CHOICES, SECTIONS, RunConfig
from lora_app.ui.blocks import build_app
from lora_app.ui.form import CHECKBOX_TEXT
from lora_app.ui.settings import CHECKBOXES, CLI_ONLY, DEQUANTIZE, config_to_form, form_to_config
from lora_app.ui.train_step import LAUNCH_KEYS

FIELDS = {f.name: f for section in SECTIONS for f in fields(section)}


@pytest.fixture(scope="module")
def page_form(tmp_path_factory) -> dict[str, gr.components.Component]:
    """The widgets Start reads, by the config name they reach its handler under."""
    demo = build_app(tmp_path_factory.mktemp("form") / "runs")
    start = next(fn for fn in demo.fns.values() if fn.api_name == "start")
    named = dict(zip(start.input_keyword_names, start.inputs[-len(start.input_keyword_names):], strict=True))
    return {name: widget for name, widget in named.items() if name not in LAUNCH_KEYS}


def test_every_setting_is_on_the_page_or_cli_only(page_form):
    assert set(CLI_ONLY) <= set(FIELDS)
    missing = sorted(set(FIELDS) - set(CLI_ONLY) - set(page_form))
    assert not missing, f"settings neither on the page nor in settings.CLI_ONLY: {missing}"
    assert set(page_form) <= set(FIELDS) - set(CLI_ONLY)


def test_page_defaults_are_run_configs(page_form):
    shown = config_to_form(RunConfig())  # dequantize None as "auto", modules as in-block paths, prompts as lines
    wrong = {name: (widget.value, shown[name]) for name, widget in page_form.items() if widget.value != shown[name]}
    assert not wrong, f"page default != RunConfig()'s (page, config): {wrong}"
    assert config_to_form(form_to_config({name: widget.value for name, widget in page_form.items()})) == shown


def test_labels_come_from_the_config(page_form):
    label = {name: CHECKBOX_TEXT[name][0] if name in CHECKBOXES else FIELDS[name].metadata["label"] for name in FIELDS}
    wrong = {name: w.label for name, w in page_form.items() if w.label != label[name]}
    assert not wrong


def test_choices_are_the_configs(page_form):
    offered = {name: [value for _, value in w.choices] for name, w in page_form.items() if hasattr(w, "choices")}
    assert offered.pop("dequantize") == list(DEQUANTIZE)
    offered.pop("modules")  # the inspected model's linear modules
    assert offered == {name: list(choices) for name, choices in CHOICES.items() if name not in CHECKBOXES}


@pytest.mark.parametrize("name", sorted(CHECKBOXES))
def test_a_two_choice_setting_as_a_checkbox(page_form, name):
    """report_to is a checkbox on the page (ticked: tensorboard), its config and CLI keep the choice's name."""
    off, on = CHECKBOXES[name]
    assert isinstance(page_form[name], gr.Checkbox) and page_form[name].value is False
    assert tuple(CHOICES[name]) == (off, on)
    values = {n: w.value for n, w in page_form.items()} | {"model": "/m", "data": "/d"}
    for ticked, choice in ((True, on), (False, off)):
        config = form_to_config(values | {name: ticked})
        assert config.to_flat()[name] == choice and config_to_form(config)[name] is ticked
    assert form_to_config(values | {name: on}).to_flat()[name] == on  # a choice's name (YAML, API) as it is


def test_bounds_are_the_configs(page_form):
    """Numbers name their range in their info line and leave the check to the config (form.py says why); a
    slider spans the range, an open end one step in."""
    wrong = {name: page_range(page_form[name]) for name in BOUNDS  # missing ones: the test above
             if name in page_form and page_range(page_form[name]) != config_range(name, page_form[name])}
    assert not wrong, f"page ranges that are not the config's: {wrong}"


def page_range(w: gr.components.Component) -> tuple:
    if isinstance(w, gr.Slider):
        return "slider", round(w.minimum, 6), round(w.maximum, 6)
    return type(w).__name__, w.minimum, w.maximum, w.precision, w.info


def config_range(name: str, w: gr.components.Component) -> tuple:
    b = BOUNDS[name]
    if isinstance(w, gr.Slider):
        return "slider", round(b.low + w.step * b.low_open, 6), round(b.high - w.step * b.high_open, 6)
    info = w.info if f"Allowed: {b.text()}." in (w.info or "") else f"... Allowed: {b.text()}."
    return "Number", None, None, 0 if str(FIELDS[name].type) == "int" else None, info
