"""Config validation: every numeric setting has a documented range (config.BOUNDS), and a value outside it is one
line naming the setting, the bound and the value, before anything is built or handed to MLX."""

from __future__ import annotations

import time
from dataclasses import fields

import pytest

from lora_app.config import (
    BOUNDS,
    MAX_BLOCK,
    MAX_LAYERS_CHARS,
    SECTIONS,
    ConfigError,
    RunConfig,
    field_help,
    to_mlx_lm_yaml_dict,
)


def refusal(flat: dict) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat(flat)
    return str(info.value)


def test_every_numeric_setting_has_a_bound() -> None:
    numeric = {f.name for s in SECTIONS for f in fields(s) if str(f.type).split(" ")[0] in ("int", "float")}
    assert numeric == set(BOUNDS)


def test_help_text_states_the_range() -> None:
    helps = field_help()
    assert helps["rank"].endswith("Allowed: [1, 4096].")
    assert helps["dropout"].endswith("Allowed: [0, 1).")


@pytest.mark.parametrize("name", sorted(n for n, b in BOUNDS.items() if not b.high_open))
def test_top_of_each_range_is_accepted_and_above_it_refused(name: str) -> None:
    high = BOUNDS[name].high
    RunConfig.from_flat({name: high})
    assert refusal({name: high * 10}).startswith(f"{name} must be at most {high} (got {high * 10}")


@pytest.mark.parametrize("name, value, message", [
    ("probe_max_tokens", -5, "probe_max_tokens must be at least 1 (got -5)"),
    ("probe_max_tokens", 0, "probe_max_tokens must be at least 1 (got 0)"),
    ("seed", -1, "seed must not be negative (got -1)"),
    ("split_seed", -1, "split_seed must not be negative (got -1)"),
    ("val_batches", -2, "val_batches must be at least -1 (got -2)"),
    ("valid_fraction", 0, "valid_fraction must be in (0, 1) (got 0.0)"),
])
def test_bottom_of_each_range_is_refused(name: str, value: float, message: str) -> None:
    assert refusal({name: value}) == message


def test_seed_range_is_what_mlx_accepts() -> None:
    import mlx.core as mx

    high = int(BOUNDS["seed"].high)
    mx.random.seed(high)
    mx.random.seed(high * 1_000_003 + 10_000_000)  # the trainer's per-step dropout seed, at the last step
    assert refusal({"seed": high + 1}) == f"seed must be at most {high} (got {high + 1})"


@pytest.mark.parametrize("value", ["1e30", 1e30])
def test_huge_counts_are_one_line_not_an_overflow_later(value: str | float) -> None:
    # int(1e30) is a valid Python int; MLX's std::bad_cast came much later, inside the trainer.
    assert refusal({"iters": value}) == "iters must be at most 10000000 (got 1e+30)"
    assert refusal({"epochs": value}) == "epochs must be at most 100000 (got 1e+30)"


def test_whole_numbers_in_exponent_form_are_ints() -> None:
    assert RunConfig.from_flat({"iters": "1e3", "seed": 7.0}).train.iters == 1000
    assert "iters: expected int, got '2.5'" in refusal({"iters": "2.5"})


def test_a_pasted_megabyte_is_a_short_message() -> None:
    message = refusal({"iters": "9" * 1_000_000})
    assert message.startswith("iters: expected int, got '999") and len(message) < 200


@pytest.mark.parametrize("spec, message", [
    ("0-20000000", f"layers: block numbers must be at most {MAX_BLOCK} (got 20000000)"),
    ("last:" + "9" * 5000, f"layers: block numbers must be at most {MAX_BLOCK} (got a 5000-digit number)"),
    (",".join(["1"] * 10_000), f"layers must be at most {MAX_LAYERS_CHARS} characters (got 19999)"),
])
def test_layer_numbers_and_length_are_bounded(spec: str, message: str) -> None:
    start = time.perf_counter()
    assert refusal({"layers": spec}) == message
    assert time.perf_counter() - start < 0.5
    RunConfig.from_flat({"layers": f"0-{MAX_BLOCK}"})  # the model's own size is checked when it is loaded


@pytest.mark.parametrize("num_layers, layers", [(0, "all"), (-1, "all"), (-3, "all"), (None, "all"), (2, "last:2")])
def test_mlx_lm_num_layers_reads_as_mlx_lm_adapts(num_layers, layers) -> None:
    """mlx-lm adapts model.layers[-max(num_layers, 0):]: 0 and below are every block (adapters/reader.py agrees)."""
    assert RunConfig.from_flat({"num_layers": num_layers}).lora.layers == layers


def test_num_layers_not_a_number_is_one_line() -> None:
    with pytest.raises(ConfigError, match="^num_layers: expected a whole number, got 'many'$"):
        RunConfig.from_flat({"num_layers": "many"})


def test_mlx_lm_optimizer_settings_are_read_or_refused() -> None:
    """mlx-lm passes optimizer_config[its optimizer] to the optimizer: adamw's weight_decay is ours; what we cannot
    honour (other arguments) is refused by name rather than dropped, which would train other than the file says."""
    read = RunConfig.from_flat({"optimizer": "adamw", "optimizer_config": {"adam": {}, "adamw": {"weight_decay": 0.1}}})
    assert read.train.weight_decay == 0.1
    assert RunConfig.from_flat({"optimizer_config": {"adamw": {"weight_decay": 0.1}}}).train.weight_decay == 0.0
    unchanged = RunConfig.from_flat({"grad_accumulation_steps": 1, "optimizer_config": {"adam": {}}})
    assert unchanged.to_flat() == RunConfig().to_flat()
    with pytest.raises(ConfigError, match=r"^optimizer_config.adamw: betas, eps: not supported"):
        RunConfig.from_flat({"optimizer": "adamw", "optimizer_config": {"adamw": {"betas": [0.9, 0.95], "eps": 1e-6}}})
    with pytest.raises(ConfigError, match="^optimizer_config: expected a mapping"):
        RunConfig.from_flat({"optimizer_config": "adamw"})


def test_a_constant_rate_reaches_mlx_lm() -> None:
    """The YAML written for mlx-lm keeps a constant schedule and its warm-up: mlx-lm's own build_schedule ramps to
    the rate and holds it, and our CLI reads the file back to the same settings (not as our default, cosine)."""
    from mlx_lm.tuner.utils import build_schedule

    config = RunConfig.from_flat({"lr_schedule": "constant", "warmup": 4, "learning_rate": 2e-4})
    written = to_mlx_lm_yaml_dict(config)
    schedule = build_schedule(written["lr_schedule"])
    assert [round(float(schedule(step)) / 2e-4, 6) for step in (0, 2, 4, 5, 50)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert RunConfig.from_flat(written).to_flat() == config.to_flat()
    constant = RunConfig.from_flat({"lr_schedule": "constant", "learning_rate": 2e-4})
    written = to_mlx_lm_yaml_dict(constant)
    assert [round(float(build_schedule(written["lr_schedule"])(step)) / 2e-4, 6) for step in (0, 50)] == [1.0, 1.0]
    assert RunConfig.from_flat(written).to_flat() == constant.to_flat()
