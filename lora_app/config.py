"""The run configuration: one dataclass per section. Each field says everything about itself in its metadata
(setting(): help text, the page's label, choices, bounds), which the CLI's flags, validation and the page's
widgets (ui/form.py) all read.

A run's config is stored flat (one key per field) in `config.json` and in YAML files, with mlx-lm's names
where mlx-lm has the same setting, so `python -m lora_app train --config` and `mlx_lm.lora --config`
read the same file. This module imports neither mlx nor gradio: the UI reads configs without loading MLX.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

DEMO = "demo"  # the built-in offline model / dataset (see lora_app/demo.py)
LAYER_SPEC = re.compile(r"^(all|last:\d+|\d+-\d+|\d+(,\d+)*)$")
# The layers spec's limits, checked before anything is built from it: no model has 100,000 blocks, and a list of
# every block of the largest model is a few thousand characters.
MAX_BLOCK = 100_000
MAX_LAYERS_CHARS = 10_000
SEED_MAX = 2**32 - 1  # mx.random.seed takes 0 .. 2**64-1; the trainer derives per-step seeds from it


@dataclass(frozen=True)
class Bound:
    """A numeric setting's allowed range; `open` ends exclude the bound itself (alpha > 0, dropout < 1)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def text(self) -> str:
        return (f"{'(' if self.low_open else '['}{shown(self.low)}, "
                f"{shown(self.high)}{')' if self.high_open else ']'}")


# Upper bounds are far above any real run; they exist so a typo or a hostile form value (1e30) is one line of
# validation, not an overflow inside MLX.
HUGE = 10_000_000


def setting(default: Any, label: str, doc: str, *, choices: tuple[str, ...] = (), bounds: Bound | None = None) -> Any:
    """A config field and everything said about it: `help` (the CLI's --help, the page's info line), `label` (the
    page's), and where they apply `choices` and `bounds` (validation, the page's dropdowns and sliders)."""
    metadata: dict[str, Any] = {"label": label, "help": doc}
    if choices:
        metadata["choices"] = choices
    if bounds:
        metadata["bounds"] = bounds
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and what is wrong."""


@dataclass
class ModelConfig:
    model: str = setting(DEMO, "Model: 'demo', a folder path or a hub repo id",
                         "Model folder, Hugging Face repo id, or 'demo'.")
    dequantize: bool | None = setting(
        None, "De-quantize a quantized base (auto: yes on CPU, no on GPU = QLoRA)",
        "De-quantize a quantized base on load (default: yes on CPU, where quantized matmuls are slow; no on GPUs, "
        "which is QLoRA).")


@dataclass
class LoraConfig:
    method: str = setting(
        "lora", "Method",
        "lora (low-rank adapter), dora (LoRA plus a learned magnitude per output, mlx-lm's DoRALinear) or full "
        "(every weight of the chosen blocks' modules trained, saved as a whole model folder).",
        choices=("lora", "dora", "full"))
    rank: int = setting(8, "Rank r", "LoRA rank r.", bounds=Bound(1, 4096))
    alpha: float = setting(16.0, "Alpha", "LoRA alpha; the update is scaled by alpha / rank.",
                           bounds=Bound(0, 1_000_000, low_open=True))
    dropout: float = setting(0.0, "Dropout", "Dropout on the LoRA input.", bounds=Bound(0, 1, high_open=True))
    modules: list[str] = setting(
        ["q_proj", "v_proj"], "Modules (from the inspected model)",
        "Linear modules to adapt, by last name component (q_proj means self_attn.q_proj).")
    layers: str = setting("all", "Blocks (all, last:N, A-B or 0,2,5)",
                          "Blocks to adapt: all, last:N, A-B (inclusive) or a list like 0,2,5.")
    init_adapter: str = setting(
        "", "Start from adapter (optional: continue training an adapter)",
        "Adapter folder (ours, mlx_lm.lora's or PEFT) or its .safetensors file whose weights this run starts from; "
        "its rank, modules and blocks must match.")


@dataclass
class DataConfig:
    data: str = setting(DEMO, "Data: 'demo', a folder or a file (.jsonl/.json/.csv/.parquet)",
                        "Data folder, single file, Hugging Face dataset, or 'demo'.")
    data_format: str = setting("auto", "Format", "auto, text, completions, chat, instruction or preference "
                               "(chosen/rejected pairs, for DPO and ORPO).",
                               choices=("auto", "text", "completions", "chat", "instruction", "preference"))
    columns: dict[str, str] = setting({}, "Columns", "Column mapping, e.g. {prompt: question, completion: answer}.")
    hf_split: str = setting("", "Hub dataset split", "Split of a Hugging Face dataset to use for training.")
    valid_fraction: float = setting(0.1, "Validation share (single file)",
                                    "Share of a single file held out for validation.",
                                    bounds=Bound(0, 1, low_open=True, high_open=True))
    split_seed: int = setting(0, "Split seed (single file)", "Seed of the train/valid split of a single file.",
                              bounds=Bound(0, SEED_MAX))
    mask_prompt: bool = setting(False, "Train on completions / assistant turns only",
                                "Train on completions / assistant turns only.")
    skip_bad_rows: bool = setting(False, "Skip bad rows", "Skip rows that cannot be used, and count them.")


@dataclass
class TrainConfig:
    iters: int = setting(200, "Iterations", "Training steps (total, also when resuming).", bounds=Bound(1, HUGE))
    epochs: float = setting(0.0, "Epochs (if > 0, instead of iterations)",
                            "If > 0, train this many epochs instead of --iters.", bounds=Bound(0, 100_000))
    batch_size: int = setting(4, "Batch size", "Sequences per step (over all processes).",
                              bounds=Bound(1, 100_000))
    grad_accumulation: int = setting(
        1, "Gradient accumulation (batches a step)",
        "Batches whose gradients make one step's update: a step trains batch size × this many sequences at one "
        "batch's memory.", bounds=Bound(1, 10_000))
    learning_rate: float = setting(1e-4, "Learning rate", "Peak learning rate.",
                                   bounds=Bound(0, 1e38, low_open=True))  # ~float32's largest; test_nan.py trains at it
    warmup: int = setting(0, "Warm-up steps", "Linear warm-up steps.", bounds=Bound(0, HUGE))
    lr_schedule: str = setting("cosine", "Schedule", "cosine (decay to 0 at the end) or constant.",
                               choices=("cosine", "constant"))
    optimizer: str = setting("adamw", "Optimizer", "adam or adamw.", choices=("adam", "adamw"))
    weight_decay: float = setting(0.0, "Weight decay", "AdamW weight decay.", bounds=Bound(0, 100))
    grad_clip: float = setting(0.0, "Gradient clip (0: off)", "Clip gradients to this global norm (0: off).",
                               bounds=Bound(0, 1_000_000_000))
    max_seq_length: int = setting(2048, "Max sequence length", "Longer sequences are truncated.",
                                  bounds=Bound(1, 1_048_576))
    batching: str = setting(
        "packed", "Batching",
        "packed (short rows share a row up to the max sequence length, few shapes: fast; a step then holds more "
        "tokens, so an epoch takes fewer steps) or padded (one row each).", choices=("packed", "padded"))
    steps_per_report: int = setting(10, "Steps per report", "Steps between train-loss reports.",
                                    bounds=Bound(1, HUGE))
    steps_per_eval: int = setting(50, "Steps per eval (0: never)", "Steps between validations (0: never).",
                                  bounds=Bound(0, HUGE))
    val_batches: int = setting(25, "Validation batches (-1: all)", "Validation batches (-1: the whole set).",
                               bounds=Bound(-1, HUGE))
    save_every: int = setting(100, "Save every (steps)", "Steps between checkpoints.", bounds=Bound(1, HUGE))
    keep_checkpoints: int = setting(3, "Checkpoints kept", "Checkpoints kept (the newest is never deleted).",
                                    bounds=Bound(1, 10_000))
    seed: int = setting(0, "Seed", "Random seed (LoRA init, data order, dropout).", bounds=Bound(0, SEED_MAX))
    grad_checkpoint: bool = setting(False, "Gradient checkpointing (less memory, slower)",
                                    "Recompute activations: less memory, slower.")
    memory_limit_gb: float = setting(
        0.0, "Memory limit (GB, 0: automatic)",
        "Cap MLX memory (GB). 0: on a GPU, a cap a little above the first step's peak, which keeps memory low; a "
        "higher cap lets MLX run further ahead of the GPU, faster at more memory (bench/README.md).",
        bounds=Bound(0, 1_000_000))
    early_stop_patience: int = setting(0, "Early stop: patience (evals, 0: off)",
                                       "Stop after this many evaluations without improvement (0: off).",
                                       bounds=Bound(0, 1_000_000))
    early_stop_min_delta: float = setting(0.0, "Early stop: min improvement",
                                          "Smallest validation-loss drop that counts as improvement.",
                                          bounds=Bound(0, 1_000_000))
    probe_prompts: list[str] = setting(
        [], "Sample probes: up to 5 prompts, one per line, answered greedily at each evaluation",
        "Up to 5 prompts answered greedily at each evaluation.")
    probe_max_tokens: int = setting(32, "Probe answer tokens", "Tokens generated per probe answer.",
                                    bounds=Bound(1, 4096))
    objective: str = setting(
        "sft", "Objective",
        "sft (next-token loss; on preference data, the chosen answers), dpo or orpo (preference pairs: "
        "chosen/rejected).", choices=("sft", "dpo", "orpo"))
    beta: float = setting(0.1, "DPO beta", "DPO's beta: how far the trained model may move from the reference.",
                          bounds=Bound(0, 1000, low_open=True))
    orpo_lambda: float = setting(0.1, "ORPO lambda", "ORPO's weight of the odds-ratio term beside the chosen "
                                 "answers' NLL.", bounds=Bound(0, 1000))
    report_to: str = setting("none", "Report to", "none, or tensorboard: the scalars also as TensorBoard event "
                             "files in the run folder (tensorboard/).", choices=("none", "tensorboard"))


SECTIONS = (ModelConfig, LoraConfig, DataConfig, TrainConfig)
# Each numeric setting's range and each enumerated setting's choices, read from the fields above.
BOUNDS: dict[str, Bound] = {f.name: f.metadata["bounds"] for s in SECTIONS for f in fields(s) if "bounds" in f.metadata}
CHOICES: dict[str, tuple[str, ...]] = {f.name: f.metadata["choices"] for s in SECTIONS for f in fields(s)
                                       if "choices" in f.metadata}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for section in (self.model, self.lora, self.data, self.train):
            flat.update(asdict(section))
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Build from flat keys (ours or mlx-lm's); unknown keys are an error naming them."""
        flat = translate_mlx_lm_keys(dict(flat))
        known = all_field_names()
        unknown = sorted(set(flat) - known - IGNORED_MLX_LM_KEYS)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        sections = []
        for section_cls in SECTIONS:
            values = {}
            for f in fields(section_cls):
                if f.name in flat and flat[f.name] is not None:
                    values[f.name] = coerce(f, flat[f.name])
            sections.append(section_cls(**values))
        config = cls(*sections)
        config.validate()
        return config

    def validate(self) -> None:
        lo, tr, flat = self.lora, self.train, self.to_flat()
        problems = [p for name in BOUNDS if (p := bound_problem(name, flat[name]))]
        if not lo.modules:
            problems.append("modules: choose at least one module to adapt")
        if p := layers_problem(str(lo.layers)):
            problems.append(p)
        for name, choices in CHOICES.items():
            if flat[name] not in choices:
                problems.append(f"{name} must be {or_list(choices)} (got {flat[name]!r})")
        if lo.method == "full" and tr.objective == "dpo":
            problems.append("objective dpo compares with the base model, which method full does not keep (it "
                            "trains the weights themselves): choose lora or dora, or objective orpo")
        if len(tr.probe_prompts) > 5:
            problems.append(f"probe_prompts: at most 5 prompts (got {len(tr.probe_prompts)})")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def scale(self) -> float:
        return self.lora.alpha / self.lora.rank


def shown(value: Any) -> str:
    """A number for a message or help text: huge integers short (int(1e30) has 31 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"{float(value):.3g}" if abs(value) < 10**300 else f"about 1e+{int(math.log10(abs(value)))}"
    return str(value)


def or_list(words: tuple[str, ...]) -> str:
    """('a', 'b', 'c') -> 'a, b or c'."""
    return " or ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else "".join(words)


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to one readable piece (a pasted megabyte must not become the error line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def bound_problem(name: str, value: Any) -> str | None:
    """The one-line problem with a numeric setting's value (BOUNDS), or None when it is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}: expected a number (got {short_repr(value)})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number (got {value})"
    b = BOUNDS[name]
    too_low = value <= b.low if b.low_open else value < b.low
    too_high = value >= b.high if b.high_open else value > b.high
    if not (too_low or too_high):
        return None
    if b.high_open:  # a fraction: the interval says it best
        return f"{name} must be in {b.text()} (got {shown(value)})"
    if too_high:
        return f"{name} must be at most {shown(b.high)} (got {shown(value)})"
    if b.low_open:
        return f"{name} must be greater than {shown(b.low)} (got {shown(value)})"
    if b.low == 0:
        return f"{name} must not be negative (got {shown(value)})"
    return f"{name} must be at least {shown(b.low)} (got {shown(value)})"


def layers_problem(spec: str) -> str | None:
    """The layers spec's form and size, checked without building anything (the model's own block count is
    checked later, by lora.parse_layers)."""
    if len(spec) > MAX_LAYERS_CHARS:
        return f"layers must be at most {MAX_LAYERS_CHARS} characters (got {len(spec)})"
    if not LAYER_SPEC.match(spec):
        return f"layers must be all, last:N, A-B or a list like 0,2,5 (got {short_repr(spec)})"
    big = [n for n in re.findall(r"\d+", spec) if len(n.lstrip("0")) > len(str(MAX_BLOCK)) or int(n) > MAX_BLOCK]
    if big:
        return f"layers: block numbers must be at most {MAX_BLOCK} (got {shown_digits(big[0])})"
    return None


def shown_digits(digits: str) -> str:
    """A run of digits for a message; int() refuses more than 4300 digits, and nobody reads 40."""
    digits = digits.lstrip("0") or "0"
    return digits if len(digits) <= 15 else f"a {len(digits)}-digit number"


def all_field_names() -> set[str]:
    return {f.name for section in SECTIONS for f in fields(section)}


def field_help() -> dict[str, str]:
    """Each field's help text, with its allowed range where it has one (BOUNDS)."""
    return {f.name: f.metadata.get("help", "") + (f" Allowed: {BOUNDS[f.name].text()}." if f.name in BOUNDS else "")
            for section in SECTIONS for f in fields(section)}


def field_defaults() -> dict[str, Any]:
    return RunConfig().to_flat()


def coerce(f, value: Any) -> Any:
    """Turn YAML/CLI values into the field's type, with a message naming the field when that fails."""
    kind = str(f.type)
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind.startswith("int"):
            return to_int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): str(v) for k, v in value.items()}
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{f.name}: expected {kind.split(' ')[0]}, got {short_repr(value)}") from None


def to_int(value: Any) -> int:
    """An int from an int, a whole float or a string of either: '1e3' is 1000, so '1e30' reaches the bounds check
    and its message instead of overflowing later; '2.5' and 'inf' are refused."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


# mlx-lm keys with no meaning for us (kept so its YAML files load unchanged).
IGNORED_MLX_LM_KEYS = {
    "train", "test", "test_batches", "adapter_path", "config",
    "clear_cache_threshold", "project_name", "trust_remote_code", "wandb", "hf_dataset",
}


def translate_mlx_lm_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """Map mlx-lm's config keys onto ours: lora_parameters.scale -> alpha, num_layers -> layers, ..."""
    if "fine_tune_type" in flat:
        flat.setdefault("method", flat.pop("fine_tune_type"))
    if flat.get("report_to") not in (None, "none", "tensorboard"):  # mlx-lm's wandb / swanlab: not ours
        flat.pop("report_to")
    params = flat.pop("lora_parameters", None)
    if params:
        rank = params.get("rank", flat.get("rank", 8))
        flat.setdefault("rank", rank)
        if "scale" in params and "alpha" not in flat:
            flat["alpha"] = float(params["scale"]) * float(rank)
        if "dropout" in params:
            flat.setdefault("dropout", params["dropout"])
        if params.get("keys"):
            flat.setdefault("modules", [k.rsplit(".", 1)[-1] for k in params["keys"]])
    if "num_layers" in flat:
        n = flat.pop("num_layers")
        try:
            n = None if n is None else int(n)
        except (TypeError, ValueError):
            raise ConfigError(f"num_layers: expected a whole number, got {n!r}") from None
        # mlx-lm adapts model.layers[-max(n, 0):]: 0 and below mean every block, as in adapters/reader.py
        flat.setdefault("layers", "all" if n is None or n <= 0 else f"last:{n}")
    schedule = flat.pop("lr_schedule", None)
    if isinstance(schedule, dict):  # mlx-lm form: {name: cosine_decay, arguments: [...], warmup: N}
        flat["lr_schedule"] = "cosine" if "cosine" in schedule.get("name", "") else "constant"
        flat.setdefault("warmup", schedule.get("warmup", 0))
    elif schedule is not None:
        flat["lr_schedule"] = schedule
    if "steps_per_save" in flat:
        flat.setdefault("save_every", flat.pop("steps_per_save"))
    resume_file = flat.pop("resume_adapter_file", None)  # mlx-lm: start from these weights
    if resume_file:
        flat.setdefault("init_adapter", resume_file)
    if "grad_accumulation_steps" in flat:
        translate_accumulation(flat)
    translate_optimizer_config(flat)
    return flat


# mlx-lm counts these in batches; with gradient accumulation our steps are updates of several batches
MLX_LM_BATCH_COUNTS = ("iters", "steps_per_report", "steps_per_eval", "save_every")


def translate_accumulation(flat: dict[str, Any]) -> None:
    """mlx-lm's grad_accumulation_steps onto ours, and its counts of batches (iters, ...) onto our steps: each of
    ours is an update of that many batches, where mlx-lm's iterations are batches (rounded up to whole steps)."""
    steps = flat.pop("grad_accumulation_steps")
    try:
        steps = to_int(steps)
    except (TypeError, ValueError):
        raise ConfigError(f"grad_accumulation_steps: expected a whole number, got {steps!r}") from None
    if steps < 1:
        raise ConfigError(f"grad_accumulation_steps: {steps}: must be at least 1")
    flat.setdefault("grad_accumulation", steps)
    for key in MLX_LM_BATCH_COUNTS:
        try:
            value = to_int(flat[key])
        except (KeyError, TypeError, ValueError):
            continue  # absent, or left for the bounds check, whose message names the key
        flat[key] = math.ceil(value / steps) if value > 0 else value


def translate_optimizer_config(flat: dict[str, Any]) -> None:
    """mlx-lm's optimizer_config ({optimizer name: its keyword arguments}, of which mlx-lm passes the chosen
    optimizer's) onto weight_decay, the one such argument we have; any other is an error, not silently dropped."""
    settings = flat.pop("optimizer_config", None)
    if settings is None:
        return
    chosen = str(flat.get("optimizer", "adam")).lower()  # mlx-lm's default optimizer picks the entry there
    if not isinstance(settings, dict) or not isinstance(settings.get(chosen) or {}, dict):
        raise ConfigError(f"optimizer_config: expected a mapping of optimizer names to settings, got {settings!r}")
    arguments = dict(settings.get(chosen) or {})
    if chosen == "adamw" and "weight_decay" in arguments:
        flat.setdefault("weight_decay", arguments.pop("weight_decay"))
    if arguments:
        raise ConfigError(f"optimizer_config.{chosen}: {', '.join(sorted(arguments))}: not supported here "
                          "(only adamw's weight_decay is)")


def to_mlx_lm_yaml_dict(config: RunConfig, num_blocks: int | None = None) -> dict[str, Any]:
    """Flat settings that both `python -m lora_app train --config` and `mlx_lm.lora --config` accept."""
    flat = config.to_flat()
    out: dict[str, Any] = {"train": True, "fine_tune_type": config.lora.method}
    for key in ("model", "data", "batch_size", "iters", "learning_rate", "steps_per_report", "steps_per_eval",
                "val_batches", "save_every", "max_seq_length", "seed", "grad_checkpoint", "mask_prompt",
                "optimizer"):
        out[key] = flat[key]
    layers = config.lora.layers
    if layers == "all":
        out["num_layers"] = -1
    elif layers.startswith("last:"):
        out["num_layers"] = int(layers.split(":")[1])
    else:
        raise ConfigError(f"mlx-lm configs can only adapt the last N blocks, not layers={layers!r}")
    out["lora_parameters"] = {
        "rank": config.lora.rank,
        "scale": config.scale,
        "dropout": config.lora.dropout,
        "keys": [full_module_name(m) for m in config.lora.modules],
    }
    if config.train.grad_accumulation > 1:  # mlx-lm counts batches where we count updates of several
        out["grad_accumulation_steps"] = config.train.grad_accumulation
        for key in MLX_LM_BATCH_COUNTS:
            out[key] = flat[key] * config.train.grad_accumulation
    if config.train.optimizer == "adamw":  # unless told, mlx's AdamW decays weights by 0.01; ours by weight_decay
        out["optimizer_config"] = {"adamw": {"weight_decay": config.train.weight_decay}}
    if config.train.lr_schedule == "cosine":
        total = config.train.iters
        out["lr_schedule"] = {
            "name": "cosine_decay",
            "arguments": [config.train.learning_rate, max(total - config.train.warmup, 1), 0.0],
            "warmup": config.train.warmup,
        }
    else:  # constant after any warm-up, named: our CLI reads a file without a schedule as our default, cosine
        rate = config.train.learning_rate  # a linear schedule from the rate to itself
        out["lr_schedule"] = {"name": "linear_schedule", "arguments": [rate, rate, 1], "warmup": config.train.warmup}
    if config.lora.init_adapter:  # mlx-lm wants the weights file; ours takes the folder or the file
        path = config.lora.init_adapter
        out["resume_adapter_file"] = path if path.endswith(".safetensors") else str(Path(path) / "adapters.safetensors")
    return out


def full_module_name(module: str) -> str:
    """mlx-lm matches keys against full in-block paths; map a short name onto the llama-family path."""
    if "." in module:
        return module
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return f"self_attn.{module}" if module in attn else f"mlp.{module}"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into flat keys; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear line
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"{path}: not valid {kind}: {parse_error_line(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def parse_error_line(e: Exception) -> str:
    """One line for a JSON or YAML parse error (YAML's own message spans several, with a caret drawing)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"{getattr(e, 'problem', None) or 'syntax error'} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def save_config_json(config: RunConfig, path: Path) -> None:
    from .fileio import atomic_write_json

    atomic_write_json(path, config.to_flat())


def load_run_config(path: Path) -> RunConfig:
    return RunConfig.from_flat(json.loads(Path(path).read_text(encoding="utf-8")))
