"""The form's values <-> a RunConfig: validation, mlx_lm.lora YAML in and out, the equivalent CLI command.

Engine-free. The form holds one component per config key (FORM_KEYS) and hands them to handlers by name;
`layers` is a spec string kept in step with the block-range sliders, `modules` holds in-block paths
(self_attn.q_proj), `dequantize` is auto/yes/no, `probe_prompts` one prompt per line, and a setting of two choices
in CHECKBOXES a checkbox (report_to: ticked is tensorboard).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    MAX_BLOCK,
    ConfigError,
    RunConfig,
    field_defaults,
    full_module_name,
    load_config_file,
    short_repr,
    to_mlx_lm_yaml_dict,
)

# The config fields the page does not show (form.py says why); the form is every other field, in the config's order.
CLI_ONLY = ("columns", "hf_split")
FORM_KEYS = tuple(name for name in field_defaults() if name not in CLI_ONLY)
DEQUANTIZE = {"auto": None, "yes": True, "no": False}
CHECKBOXES = {"report_to": ("none", "tensorboard")}  # a setting of two choices the page shows as a checkbox: off, on
BLOCK_NUMBER = f"([0-9]{{1,{len(str(MAX_BLOCK))}}})"  # no model has a block number longer than MAX_BLOCK's
BLOCK_NUMBER_LAST = re.compile(f"last:{BLOCK_NUMBER}")
BLOCK_NUMBER_RANGE = re.compile(f"{BLOCK_NUMBER}-{BLOCK_NUMBER}")


def form_to_flat(values: dict[str, Any]) -> dict[str, Any]:
    """Form values -> flat config keys (not yet validated)."""
    flat = {k: v for k, v in values.items() if k in FORM_KEYS and v is not None and v != ""}
    flat["dequantize"] = DEQUANTIZE.get(str(values.get("dequantize", "auto")), None)
    for key, (off, on) in CHECKBOXES.items():  # a ticked box is its `on` choice; a choice's name passes as it is
        if isinstance(values.get(key), bool):
            flat[key] = on if values[key] else off
    prompts = values.get("probe_prompts") or ""
    if isinstance(prompts, str):
        flat["probe_prompts"] = [line.strip() for line in prompts.splitlines() if line.strip()]
    for key in ("model", "data", "layers", "init_adapter"):  # an empty init_adapter: start from a fresh adapter
        if isinstance(flat.get(key), str):
            flat[key] = flat[key].strip()
    return flat


def form_to_config(values: dict[str, Any]) -> RunConfig:
    """Validated RunConfig from the form; ConfigError names every bad field."""
    flat = form_to_flat(values)
    for key in ("model", "data"):
        if not flat.get(key):
            raise ConfigError(f"{key}: empty; choose a {key} (or 'demo')")
    return RunConfig.from_flat(flat)


def config_to_form(config: RunConfig, available: list[str] | None = None) -> dict[str, Any]:
    """A RunConfig -> form values (the inverse of form_to_config)."""
    flat = config.to_flat()
    flat["dequantize"] = {None: "auto", True: "yes", False: "no"}[flat["dequantize"]]
    flat["probe_prompts"] = "\n".join(flat["probe_prompts"])
    for key, (_, on) in CHECKBOXES.items():
        flat[key] = flat[key] == on
    flat["modules"] = module_choices(flat["modules"], available)
    return {k: flat[k] for k in FORM_KEYS}


def module_choices(modules: list[str], available: list[str] | None) -> list[str]:
    """Config module names (q_proj or self_attn.q_proj) -> the in-block paths the checkboxes offer."""
    out = []
    for m in modules:
        hits = [a for a in available or [] if a == m or a.rsplit(".", 1)[-1] == m]
        out += hits or [full_module_name(m)]
    return sorted(set(out))


def layers_from_range(first: int, last: int, num_blocks: int) -> str:
    """Block range -> a layers spec; ranges that end at the top block use mlx-lm's form (all / last:N)."""
    try:
        first, last = int(first), int(last)
    except (TypeError, ValueError, OverflowError):  # a request can send anything, inf included
        raise ConfigError(f"block range: expected block numbers, got {short_repr(first)} and {short_repr(last)}"
                          ) from None
    if first > last:
        raise ConfigError(f"block range: first block {first} is after last block {last}")
    if num_blocks and last == num_blocks - 1:
        return "all" if first == 0 else f"last:{num_blocks - first}"
    return f"{first}-{last}"


def range_from_layers(spec: str, num_blocks: int) -> tuple[int, int]:
    """The inverse, for specs that are a contiguous range; anything else shows the whole model. Only numbers a
    block can have are read (int() refuses over 4300 digits, and '²'.isdigit() is true but int('²') fails)."""
    spec = str(spec).strip()
    top = max(num_blocks - 1, 0)
    if m := BLOCK_NUMBER_LAST.fullmatch(spec):
        return max(num_blocks - int(m[1]), 0), top
    if m := BLOCK_NUMBER_RANGE.fullmatch(spec):
        return min(int(m[1]), top), min(int(m[2]), top)
    return 0, top


def import_yaml(path: str | Path, available: list[str] | None = None) -> dict[str, Any]:
    """An mlx_lm.lora (or our) YAML/JSON config -> form values; ConfigError names the file and the key."""
    flat = load_config_file(path)
    try:
        config = RunConfig.from_flat(flat)
    except ConfigError as e:
        raise ConfigError(f"{Path(path).name}: {e}") from None
    return config_to_form(config, available)


def export_yaml(config: RunConfig) -> str:
    """YAML that both `python -m lora_app train --config` and `mlx_lm.lora --config` accept."""
    return yaml.safe_dump(to_mlx_lm_yaml_dict(config), sort_keys=False)


def command_preview(config: RunConfig, out: str = "runs/<name>", extra: list[str] | None = None) -> str:
    """The equivalent CLI command: model, data, every setting that differs from its default, then `extra`
    (the data-parallel launch: --nproc N or --hosts FILE)."""
    defaults = field_defaults()
    flat = config.to_flat()
    args = ["python", "-m", "lora_app", "train", "--model", flat["model"], "--data", flat["data"]]
    for key, value in flat.items():
        if key in ("model", "data") or value == defaults[key] or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            args += [flag, ",".join(value)]
        elif isinstance(value, dict):
            args += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(shlex.quote(a) for a in args + ["--out", out] + list(extra or []))
