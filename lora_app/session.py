"""prepare(): everything a run trains with, built and checked before step 1 (trainer.py's train() runs it).

The model with its adapters, the data and its batch plan, the optimizer, and on resume the newest checkpoint that
reads back whole. Every problem found here ends the run before anything in the run folder is overwritten.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .batching import Batch, BatchPlan, eval_batches
from .checkpoints import CheckpointError, checkpoint_dirs, load_checkpoint
from .config import RunConfig
from .distributed import world
from .head_loss import Head


class Reporter(Protocol):
    """Where a run's events go (runs.RunFolderReporter: events.jsonl and train.log, written by rank 0 only)."""

    def event(self, kind: str, **fields: Any) -> None: ...

    def log(self, message: str) -> None: ...


@dataclass
class Progress:
    """Everything besides weights and optimizer state that exact resume needs."""

    step: int = 0
    trained_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0


@dataclass
class Session:
    """A run ready to train: what prepare() built, what train() reads (and advances: `progress`)."""

    run_dir: Path
    cfg: RunConfig
    rank: int
    size: int
    model: Any
    tokenizer: Any
    head: Head | None
    plan: BatchPlan
    val: list[Batch]
    optimizer: Any
    total_steps: int
    adapter_config: dict
    started: float  # perf_counter() when preparing began: the first step's time counts loading and compiling
    progress: Progress = field(default_factory=Progress)
    resumed_from: str | None = None  # the checkpoint this process started from


def prepare(run_dir: Path, cfg: RunConfig, resume: bool, reporter: Reporter) -> Session:
    """Load the model and apply the adapters, read and plan the data, build the optimizer; on resume, restore the
    newest readable checkpoint; else start from `init_adapter` when one is given. Raises on any problem."""
    import mlx.core as mx

    from . import dequantized_matmul
    from .adapters import adapter_config
    from .data import load_data
    from .head_loss import find_head
    from .lora import apply_lora, trainable_parameter_count
    from .models import blocks_of, is_hub_id, load_model, resolve_model
    from .runs import prepare_run_folder

    started = time.perf_counter()
    lap = Laps()
    import mlx_lm.utils  # noqa: F401 - the run's biggest import (transformers with it): timed apart from the load

    lap("mlx-lm import")
    rank, size = world()
    t = cfg.train
    if rank == 0:
        prepare_run_folder(run_dir)
    if t.memory_limit_gb:
        mx.set_memory_limit(int(t.memory_limit_gb * 1e9))
    base_path = resolve_model(cfg.model.model)
    # The adapter names a hub model by its repo id (portable), anything else by its folder.
    base_model = cfg.model.model if is_hub_id(cfg.model.model) else base_path
    model, tokenizer = load_model(base_path, cfg.model.dequantize)
    if dequantized_matmul.wanted():
        dequantized_matmul.install(model)
    lap("model")
    data = for_objective(load_data(cfg.data, tokenizer, batch_size=t.batch_size), t.objective)
    lap("data")
    for note in data.notes:
        reporter.event("info", message=note)
    targets = apply_lora(model, cfg.lora, seed=t.seed)
    plan, val = plans(cfg, data, rank, size)
    steps_per_epoch = math.ceil(plan.steps_per_epoch() / t.grad_accumulation)  # a step: an update of that many batches
    total_steps = max(1, math.ceil(t.epochs * steps_per_epoch)) if t.epochs > 0 else t.iters
    optimizer = build_optimizer(cfg, total_steps)
    optimizer.init(model.trainable_parameters())
    s = Session(run_dir=Path(run_dir), cfg=cfg, rank=rank, size=size, model=model, tokenizer=tokenizer,
                head=find_head(model), plan=plan, val=val,
                optimizer=optimizer, total_steps=total_steps, started=started,
                adapter_config=adapter_config(cfg.lora, targets, len(blocks_of(model)), base_model))
    if resume:
        restore(s, reporter)
    if cfg.lora.init_adapter and s.progress.step == 0:  # a resumed run's checkpoint wins
        start_from_adapter(s, targets, base_model, reporter)
    if t.grad_checkpoint:
        checkpoint_blocks(model.layers[0])
    lap("adapters and plan")
    n = trainable_parameter_count(model)
    reporter.event("info", message=f"trainable parameters: {n:,} ({len(targets.module_paths())} modules); "
                                   f"{steps_per_epoch} steps per epoch; {total_steps} steps",
                   trainable_params=n, steps_per_epoch=steps_per_epoch, data_format=data.format)
    check_memory(s, n, reporter)
    lap("memory check")
    reporter.event("info", message=f"ready to train in {time.perf_counter() - started:.1f} s ({lap.text()})",
                   startup=lap.seconds)
    return s


class Laps:
    """Seconds spent in each named phase, one after another (what start-up spends its time on)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.mark = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.mark, 3)
        self.mark = now

    def text(self) -> str:
        return ", ".join(f"{name} {sec:.1f} s" for name, sec in self.seconds.items())


def for_objective(data: Any, objective: str) -> Any:
    """The loaded data for the objective: DPO and ORPO need pairs; SFT on pairs trains on the chosen answers."""
    from .data_sources import DataError

    pairs = data.format == "preference"
    if objective != "sft" and not pairs:
        raise DataError([f"objective {objective} needs preference data: rows with chosen and rejected answers "
                         f"(this data's format is {data.format})"])
    if objective == "sft" and pairs:
        for split in ("train", "valid", "test"):
            setattr(data, split, [chosen for chosen, _ in getattr(data, split)])
        data.notes.append("objective sft on preference data: training on the chosen answers")
    return data


def plans(cfg: RunConfig, data: Any, rank: int, size: int) -> tuple[Any, list]:
    """The training batch plan and the validation batches: of examples, or of pairs for DPO and ORPO."""
    from .pairs import PairPlan, pair_eval_batches

    t = cfg.train
    if t.objective == "sft":
        return (BatchPlan(data.train, t.batch_size, t.max_seq_length, t.batching, t.seed, rank, size),
                eval_batches(data.valid, t.batch_size, t.max_seq_length, t.val_batches, rank, size))
    return (PairPlan(data.train, t.batch_size, t.max_seq_length, t.batching, t.seed, rank, size),
            pair_eval_batches(data.valid, t.batch_size, t.max_seq_length, t.val_batches, rank, size))


def objective_for(cfg: RunConfig, head: Head | None) -> Any:
    """What the run minimises (objective.py, preference.py)."""
    from .objective import CrossEntropy
    from .preference import Preference

    t = cfg.train
    return CrossEntropy(head) if t.objective == "sft" else Preference(t.objective, t.beta, t.orpo_lambda)


def checkpoint_blocks(block: Any) -> None:
    """Gradient checkpointing of every block of this type, as mlx-lm's grad_checkpoint does it, except that only
    the parameters and the hidden state pass through mx.checkpoint: it asks for a gradient of every array it is
    given, and MLX's fused CUDA attention has none for a mask (packed rows of several sequences carry one)."""
    import mlx.core as mx

    call = type(block).__call__

    def checkpointed(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        def inner(params: Any, x: Any) -> Any:
            self.update(params)
            return call(self, x, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    type(block).__call__ = checkpointed


def build_optimizer(cfg: RunConfig, total_steps: int) -> Any:
    """AdamW (or Adam) with the run's schedule: a linear warm-up, then cosine decay to 0 or constant."""
    import mlx.optimizers as optim

    t = cfg.train
    lr: Any = t.learning_rate
    if t.lr_schedule == "cosine":
        lr = optim.cosine_decay(t.learning_rate, max(total_steps - t.warmup, 1), 0.0)
    if t.warmup:
        ramp = optim.linear_schedule(t.learning_rate * 0.0, t.learning_rate, t.warmup)
        lr = optim.join_schedules([ramp, lr if callable(lr) else (lambda _: t.learning_rate)], [t.warmup])
    if t.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=t.weight_decay)
    return optim.Adam(learning_rate=lr)


def restore(s: Session, reporter: Reporter) -> None:
    """Load the newest checkpoint that reads back whole; an unreadable one (a disk fault) is skipped. When
    checkpoints exist and none can be read, stop before anything is written: starting again from step 0
    would overwrite the run's adapters."""
    from mlx.utils import tree_flatten, tree_unflatten

    saved, problems = checkpoint_dirs(s.run_dir), []
    for checkpoint in reversed(saved):
        try:
            adapters, optimizer_state, state = load_checkpoint(checkpoint)
            break
        except Exception as e:  # noqa: BLE001 - any read failure: fall back to the one before
            why = " ".join(str(e).split()) or type(e).__name__
            problems.append(f"{checkpoint.name}: {why}")
            reporter.event("warning", message=f"checkpoint {checkpoint.name} cannot be read ({why}); "
                                              "trying an older one")
    else:
        if saved:
            raise CheckpointError(f"cannot resume {s.run_dir.name}: none of its {len(saved)} checkpoint(s) "
                                  f"can be read ({'; '.join(problems)}); nothing was changed")
        return  # nothing saved yet: start from the beginning
    s.model.load_weights(list(adapters.items()), strict=False)
    # Fill the freshly initialised state tree leaf by leaf, so its structure stays what compile captures.
    flat = dict(tree_flatten(optimizer_state))
    current = tree_flatten(s.optimizer.state)
    s.optimizer.state = tree_unflatten([(k, flat.get(k, v)) for k, v in current])
    s.progress = Progress(step=state["step"], trained_tokens=state.get("trained_tokens", 0),
                          best_val_loss=state.get("best_val_loss"), best_step=state.get("best_step"),
                          evals_since_best=state.get("evals_since_best", 0))
    s.resumed_from = checkpoint.name
    reporter.event("info", message=f"resumed from {checkpoint.name}", step=s.progress.step)


def start_from_adapter(s: Session, targets: Any, base_model: str, reporter: Reporter) -> None:
    """Start from an existing adapter's weights (continue training it); a mismatch ends the run here."""
    from .adapters import init_from_adapter

    folder, warnings = init_from_adapter(s.model, s.cfg.lora.init_adapter, s.cfg.lora, targets, base_model)
    for warning in warnings:
        reporter.event("warning", message=warning)
        reporter.log(f"warning: {warning}")
    reporter.event("info", message=f"starting from the adapter in {folder}", init_adapter=str(folder))


def check_memory(s: Session, trainable: int, reporter: Reporter) -> None:
    """Warn before the first step when the estimate exceeds what the machine (or the limit) gives."""
    from .memory import check_model

    t = s.cfg.train
    # The longest row this data really produces, not max_seq_length: activations grow with the square of it.
    row_length = min(t.max_seq_length, s.plan.row_length())
    line, warning, estimate = check_model(s.model, trainable, t.batch_size, row_length, t.grad_checkpoint,
                                          int(t.memory_limit_gb * 1e9))
    reporter.event("info", message=line, memory_estimate=estimate)
    if warning:
        reporter.event("warning", message=warning)
        reporter.log(f"warning: {warning}")
