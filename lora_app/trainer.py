"""The training loop: `train(session, objective, reporter, control)`, and `run()`, which prepares a run folder's
session (session.prepare) and trains it as one process of the CLI.

Shaped as mlx-lm's tuner train(): one loop, top to bottom, with what varies passed in: the objective (what a step
minimises, what validation reports: objective.py), the reporter (where events go: runs.RunFolderReporter) and the
control (stop and pause requests). It owns the loop instead of calling mlx-lm's so it can report every N steps
without a host sync per step, stop or pause cleanly, resume exactly, keep the best adapter and probe samples.
"""

from __future__ import annotations

import math
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from . import run_ahead, runs
from .adapters import save_adapter
from .checkpoints import roll_back, save_checkpoint
from .config import RunConfig
from .distributed import agree, all_sum, host_names, world
from .lora import adapter_tensors
from .objective import Objective, batch_arrays
from .session import Reporter, Session, objective_for, prepare

OOM_ADVICE = "Try a smaller batch size, a shorter max sequence length, or gradient checkpointing."
# How MLX (Metal, CUDA, CPU malloc) and the C++ runtime word an allocation failure.
OOM_MARKS = ("out of memory", "outofmemory", "insufficient memory", "unable to allocate", "attempting to allocate",
             "failed to allocate", "bad_alloc", "maximum allowed buffer size")
UPLOAD_MOST = 64  # steps whose input arrays are made at once (upload)


class StopTraining(Exception):
    """Raised inside the loop to end it with a given final status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Control:
    """Stop and pause requests: the run folder's `control` file (the app, `python -m lora_app stop|pause`) and
    SIGINT/SIGTERM. request() is agreed on by every process, so all leave the loop at the same step."""

    def __init__(self, run_dir: Path, rank: int = 0, size: int = 1):
        self.run_dir, self.rank, self.size = Path(run_dir), rank, size
        self.signalled = False

    def listen(self) -> None:
        """Turn SIGINT and SIGTERM into a stop at the next step (the adapter is saved)."""
        def handler(signum: int, _frame: Any) -> None:
            self.signalled = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def wished(self) -> str | None:
        """This process's own view ('stop', 'pause' or None): cheap, not agreed; ends a probe's generation early."""
        if self.signalled:
            return "stop"
        return runs.read_control(self.run_dir) if self.rank == 0 else None

    def request(self) -> tuple[str, str] | None:
        """('stopped' | 'paused', message) when a stop or pause was asked for, as every process agrees."""
        wish = self.wished()
        stop, pause = agree([wish == "stop", wish == "pause"], self.size)
        if stop:
            return "stopped", "stopped by request; the adapter is saved"
        if pause:
            return "paused", "paused; resume continues from this step"
        return None


@dataclass
class Outcome:
    status: str  # done | stopped | paused | error
    message: str
    user_error: bool = False  # bad input (one line, exit code 2), not a fault of the engine


# ---- the loop --------------------------------------------------------------------------------------------------

def train(s: Session, objective: Objective, reporter: Reporter, control: Control) -> None:
    """Train from s.progress.step to s.total_steps: report every steps_per_report, validate every steps_per_eval,
    save every save_every; a stop, a pause or a non-finite loss ends it with StopTraining."""
    import mlx.core as mx

    t, p = s.cfg.train, s.progress
    if p.step == 0 and s.cfg.lora.init_adapter and s.val and t.steps_per_eval:
        validate(s, objective, reporter, control, 0)  # the starting adapter's loss: the curve's first point
    elif p.step == 0 and t.probe_prompts:
        probe(s, reporter, control, 0)
    start_step = p.step + 1
    by_spans = attends_by_spans(s, objective)
    step_fn, state = (training_step(s.model, s.optimizer, objective, t.grad_clip) if t.grad_accumulation == 1 else
                      accumulating_step(s.model, s.optimizer, objective, t.grad_clip))
    s.model.train()
    losses: list[tuple[int, Any]] = []  # (step, loss) since the last report, read back only then
    # Summed since the last report: grad norm and the objective's own metrics (objective.metrics), one vector
    stat_sum = mx.zeros((1 + len(objective.metrics),))
    tok_sum, window_tokens, window_start, excluded = mx.array(0.0), 0, time.perf_counter(), 0.0
    upcoming = upload(s, p.step, by_spans)
    mx.reset_peak_memory()  # the peak the train events report is the training's, not the loading's
    first_batch_tokens = upcoming[0][0] if t.grad_accumulation == 1 else upcoming[0][0][0]
    before, step_1_tokens = mx.get_active_memory(), math.prod(first_batch_tokens.shape)
    usual_limit = run_ahead.tighten_for_step_1(t.memory_limit_gb)
    while p.step < s.total_steps:
        step = p.step + 1
        if s.cfg.lora.dropout > 0:
            mx.random.seed(t.seed * 1_000_003 + step)  # dropout masks depend on the step only: exact resume
        if not upcoming:  # right after a report's sync (or every UPLOAD_MOST steps of a longer report window)
            upcoming = upload(s, p.step, by_spans)
        loss, ntoks, stats = step_fn(*upcoming.popleft())
        losses.append((step, loss))
        tok_sum, stat_sum = tok_sum + ntoks, stat_sum + stats
        mx.async_eval(state, loss, tok_sum, stat_sum)  # no host sync per step: values are read back at reports only
        p.step = step
        if step == start_step:  # the first step includes loading and compiling: timed and counted apart
            mx.eval(state, tok_sum)
            step_1_peak = mx.get_peak_memory()
            biggest = (s.plan.batch_size // s.size) * (s.plan.row_length() + 1)
            run_ahead.bound_run_ahead(before, step_1_tokens, biggest, usual_limit)
            first_tokens = int(tok_sum.item())
            # On a GPU step 1 ran under tighten_for_step_1's limit: its peak is the memory a step needs
            reporter.event("first_step", step=step, seconds=time.perf_counter() - s.started, tokens=first_tokens,
                           peak_memory_gb=step_1_peak / 1e9)
            p.trained_tokens += first_tokens
            tok_sum, window_start = mx.array(0.0), time.perf_counter()
        last = step == s.total_steps
        report = step % t.steps_per_report == 0 or last
        save_now = step % t.save_every == 0 or last
        evaluate_now = bool(s.val) and t.steps_per_eval > 0 and (step % t.steps_per_eval == 0 or last)
        request = control.request()
        if not (report or save_now or evaluate_now or request):
            continue
        mx.eval(state, tok_sum)
        check_finite(s, reporter, losses, start_step)
        new_tokens = int(tok_sum.item())
        p.trained_tokens += new_tokens
        window_tokens += new_tokens
        tok_sum = mx.array(0.0)
        if (report or request) and losses:
            stats = dict(zip(("grad_norm", *objective.metrics), (stat_sum / len(losses)).tolist()))
            report_train(s, reporter, losses, window_tokens, time.perf_counter() - window_start - excluded, stats)
            losses, window_tokens, excluded, stat_sum = [], 0, 0.0, mx.zeros_like(stat_sum)
        aside = time.perf_counter()  # evaluation and saving do not count as training time
        if evaluate_now:
            validate(s, objective, reporter, control, step)
        if save_now or request:
            save(s, reporter, step)
        if request:
            raise StopTraining(*request)
        if report:
            window_start = time.perf_counter()
        else:
            excluded += time.perf_counter() - aside


def attends_by_spans(s: Session, objective: Objective) -> bool:
    """Whether this run's packed rows of several sequences attend by their spans (span_attention.py: supervised
    training on the CPU) instead of through a segment mask."""
    from .objective import CrossEntropy
    from .span_attention import enabled_for

    return isinstance(objective, CrossEntropy) and enabled_for(s.model)


def training_step(model: Any, optimizer: Any, objective: Objective, grad_clip: float = 0.0) -> tuple[Any, list]:
    """One optimizer step on a batch's arrays: returns (step, the state it updates in place). A step returns the
    loss, its token count and a vector of the gradient's global norm (before clipping) followed by the objective's
    own metrics (objective.metrics), which its loss returns as a third value. The step is compiled, except for a
    batch that ends in span_attention.Spans: its graph follows the spans' lengths, which differ batch to batch."""
    import mlx.core as mx
    import mlx.nn as nn

    from .span_attention import Spans

    value_and_grad = nn.value_and_grad(model, objective.loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step(*batch: Any) -> tuple[Any, Any, Any]:
        (loss, ntoks, *extra), grads = value_and_grad(model, *batch)
        norm = apply_gradients(model, optimizer, grads, grad_clip)
        return loss, ntoks, mx.concatenate([norm, *extra])

    compiled = mx.compile(step, inputs=state, outputs=state)

    def compiled_unless_spans(*batch: Any) -> tuple[Any, Any, Any]:
        return (step if isinstance(batch[-1], Spans) else compiled)(*batch)

    return compiled_unless_spans, state


def accumulating_step(model: Any, optimizer: Any, objective: Objective, grad_clip: float = 0.0) -> tuple[Any, list]:
    """As training_step, for gradient accumulation: a step takes several batches' arrays (`step(*batches)`) and
    makes one update with the mean of their gradients, as mlx-lm's grad_accumulation_steps does. Each batch's
    gradient is evaluated before the next batch's graph is built, so a step holds one batch's activations at a
    time. Returns the batches' mean loss and metrics, their token count, and the mean gradient's norm."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    from .span_attention import Spans

    value_and_grad = nn.value_and_grad(model, objective.loss)
    state = [model.state, optimizer.state, mx.random.state]

    def gradient(*batch: Any) -> tuple[Any, Any, Any, Any]:
        (loss, ntoks, *extra), grads = value_and_grad(model, *batch)
        return loss, ntoks, mx.concatenate([mx.zeros((0,)), *extra]), grads

    def update(grads: Any, batches: int) -> Any:
        return apply_gradients(model, optimizer, tree_map(lambda g: g / batches, grads), grad_clip)

    compiled_gradient = mx.compile(gradient, inputs=state, outputs=state)
    compiled_update = mx.compile(update, inputs=state, outputs=state)

    def step(*batches: Any) -> tuple[Any, Any, Any]:
        total = None  # the sums of (loss, tokens, metrics, gradients) over the batches so far
        for batch in batches:
            result = (gradient if isinstance(batch[-1], Spans) else compiled_gradient)(*batch)
            total = result if total is None else tree_map(mx.add, total, result)
            mx.async_eval(total)  # this batch's activations are freed before the next batch's exist
        loss, ntoks, extras, grads = total
        norm = compiled_update(grads, len(batches))
        return loss / len(batches), ntoks, mx.concatenate([norm, extras / len(batches)])

    return step, state


def apply_gradients(model: Any, optimizer: Any, grads: Any, grad_clip: float) -> Any:
    """Average the gradients over the processes, clip them (grad_clip > 0) and update the model: returns their
    global norm before clipping, as a float32 vector of one."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_flatten

    grads = average_gradients(grads)
    if grad_clip:
        grads, norm = optim.clip_grad_norm(grads, grad_clip)
    else:
        norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
    optimizer.update(model, grads)
    return norm.reshape(1).astype(mx.float32)


def upload(s: Session, first: int, spans: bool = False) -> deque:
    """The input arrays of 0-based steps `first` up to the next report (at most UPLOAD_MOST steps), made at once.

    Call it where the GPU has just been waited for. Making an array from host data can synchronize the device in
    MLX's CUDA backend: its allocator may reuse a cached buffer that last held a kernel's output, and moving that
    buffer to host-visible memory waits for all running work. Made one per step inside the loop, the inputs stalled
    the run-ahead at every step; made here, the wait finds the GPU idle already.
    """
    every, batches = s.cfg.train.steps_per_report, s.cfg.train.grad_accumulation
    steps = range(first, max(min(s.total_steps, (first // every + 1) * every, first + UPLOAD_MOST), first + 1))
    if batches == 1:
        return deque(batch_arrays(s.plan.batch_at(k), spans) for k in steps)
    # gradient accumulation: step k trains batches k * batches ... k * batches + batches - 1 (accumulating_step)
    return deque(tuple(batch_arrays(s.plan.batch_at(k * batches + j), spans) for j in range(batches)) for k in steps)


def check_finite(s: Session, reporter: Reporter, losses: list[tuple[int, Any]], start_step: int) -> None:
    """End the run on a NaN or infinite loss (seen by any process). After an update, roll back to the last good
    checkpoint; at the process's first step nothing was updated yet: the starting point is at fault, and kept."""
    bad = next(((step, v) for step, v in ((k, loss.item()) for k, loss in losses) if not math.isfinite(v)), None)
    if agree([bad is not None], s.size)[0] and bad is None:
        bad = (s.progress.step, float("nan"))
    if bad is None:
        return
    step, value = bad
    if step == start_step:
        start = (f"checkpoint {s.resumed_from}" if s.resumed_from else
                 f"the adapter in {s.cfg.lora.init_adapter}" if s.cfg.lora.init_adapter else "the base model")
        message = (f"loss was {value} at step {step}, the first step of this process, before any update: "
                   f"the starting weights ({start}) or the data give a non-finite loss, not the learning rate. "
                   "Nothing was changed.")
    else:
        last = roll_back(s.run_dir, step, s.adapter_config) if s.rank == 0 else None
        kept = f"the last good checkpoint is {last.name}" if last else "no good checkpoint had been saved yet"
        message = (f"loss became {value} at step {step}; {kept}. "
                   f"Lower the learning rate (now {s.cfg.train.learning_rate:g}) or enable "
                   "gradient clipping, then resume or start again.")
    reporter.event("error", message=message, step=step)
    raise StopTraining("error", message)


def report_train(s: Session, reporter: Reporter, losses: list[tuple[int, Any]], tokens: int,
                 elapsed: float, stats: dict[str, float] | None = None) -> None:
    """The mean loss of the steps since the last report, over all processes, with speed and memory, the learning
    rate of the last step and the means of `stats` (gradient norm, the objective's metrics)."""
    import mlx.core as mx

    loss = sum(v.item() for _, v in losses) / max(len(losses), 1)
    names = list(stats or {})
    means = all_sum(mx.array([loss, *(stats or {}).values()])) / s.size
    loss, *values = means.tolist()
    tokens = int(all_sum(mx.array(tokens)).item())
    reporter.event("train", step=s.progress.step, loss=loss, learning_rate=float(s.optimizer.learning_rate.item()),
                   tokens_per_second=tokens / max(elapsed, 1e-9), trained_tokens=s.progress.trained_tokens,
                   peak_memory_gb=mx.get_peak_memory() / 1e9, **dict(zip(names, values)))
    reporter.log(f"step {s.progress.step}/{s.total_steps} loss {loss:.4f} {tokens / max(elapsed, 1e-9):.0f} tok/s")


def validate(s: Session, objective: Objective, reporter: Reporter, control: Control, step: int) -> None:
    """The validation loss; a new best is saved to best/; then the probes, and early stopping."""
    p, t = s.progress, s.cfg.train
    s.model.eval()
    result = objective.evaluate(s.model, s.val, before_batch=partial(stop_if_asked, s, reporter, control, step))
    s.model.train()
    val_loss, metrics = result if isinstance(result, tuple) else (result, {})
    reporter.event("val", step=step, val_loss=val_loss, **metrics)
    reporter.log(f"step {step} validation loss {val_loss:.4f}")
    if p.best_val_loss is None or val_loss < p.best_val_loss - t.early_stop_min_delta:
        p.best_val_loss, p.best_step, p.evals_since_best = val_loss, step, 0
        if s.rank == 0:
            save_adapter(s.model, s.run_dir / "best", {**s.adapter_config, "step": step, "val_loss": val_loss})
        reporter.event("best", step=step, val_loss=val_loss)
    else:
        p.evals_since_best += 1
    if t.probe_prompts:
        probe(s, reporter, control, step)
    if t.early_stop_patience and p.evals_since_best >= t.early_stop_patience:
        save(s, reporter, step)
        raise StopTraining("stopped", f"early stopping: no validation improvement of at least "
                                      f"{t.early_stop_min_delta:g} in {p.evals_since_best} evaluations "
                                      f"(best {p.best_val_loss:.4f} at step {p.best_step})")


def probe(s: Session, reporter: Reporter, control: Control, step: int) -> None:
    """Each sample-probe prompt answered greedily, as a `sample` event."""
    from .generate import greedy_answer

    s.model.eval()
    for prompt in s.cfg.train.probe_prompts[:5]:
        answer = greedy_answer(s.model, s.tokenizer, prompt, s.cfg.train.probe_max_tokens, stop=control.wished)
        stop_if_asked(s, reporter, control, step)  # an answer cut short by Stop is not a sample
        reporter.event("sample", step=step, prompt=prompt, answer=answer)
    s.model.train()


def stop_if_asked(s: Session, reporter: Reporter, control: Control, step: int) -> None:
    """End the run now when a stop or pause was asked for during an evaluation or the probes, keeping the weights
    of `step` (at step 0 nothing was trained, so nothing is saved)."""
    request = control.request()
    if request:
        if step:
            save(s, reporter, step)
        raise StopTraining(*request)


def save(s: Session, reporter: Reporter, step: int) -> None:
    """The latest adapter into adapters/, and a checkpoint for exact resume (rank 0 only)."""
    if s.rank != 0:
        return
    weights = adapter_tensors(s.model)
    save_adapter(s.model, s.run_dir / "adapters", {**s.adapter_config, "step": step}, weights)
    p = s.progress
    path = save_checkpoint(s.run_dir, step, weights, s.optimizer.state, {
        "trained_tokens": p.trained_tokens, "best_val_loss": p.best_val_loss, "best_step": p.best_step,
        "evals_since_best": p.evals_since_best, "total_steps": s.total_steps,
    }, s.cfg.train.keep_checkpoints)
    reporter.event("checkpoint", step=step, path=str(path.relative_to(s.run_dir)))
    if s.cfg.lora.method == "full":
        from .full_model import save_model_folder

        folder = save_model_folder(s.model, s.tokenizer, s.cfg.model.model, s.run_dir)
        reporter.event("info", message=f"the whole model at step {step} is in {folder.name}/ (mlx_lm.load reads it)",
                       step=step)


# ---- one process of the CLI --------------------------------------------------------------------------------------

def run(run_dir: Path, cfg: RunConfig, resume: bool = False) -> Outcome:
    """Prepare and train the run in `run_dir` (this process alone, or as one rank of a data-parallel run); every
    way it can end is one event and one status in the run folder, never a traceback on the page."""
    from .user_errors import USER_ERRORS

    rank, size = world()
    reporter, control = runs.RunFolderReporter(run_dir, rank), Control(run_dir, rank, size)
    if cfg.train.report_to == "tensorboard" and rank == 0:
        from .tensorboard_writer import TensorBoardReporter

        reporter = TensorBoardReporter(reporter, run_dir)
    control.listen()
    reporter.event("status", status="starting", total_steps=cfg.train.iters)
    step, user_error = 0, False
    try:
        session = prepare(run_dir, cfg, resume, reporter)
        step = session.progress.step
        reporter.event("status", status="running", total_steps=session.total_steps, step=step, world_size=size,
                       hosts=host_names(rank, size))
        try:
            train(session, objective_for(cfg, session.head), reporter, control)
        finally:
            step = session.progress.step
        status, message = "done", "training finished"
    except StopTraining as stop:
        status, message = stop.status, stop.message
    except Exception as e:  # noqa: BLE001 - every failure ends as one plain event, not a traceback
        status, message, user_error = "error", describe_failure(e), isinstance(e, USER_ERRORS)
        if not user_error:
            traceback.print_exc()  # into train.log, for whoever debugs it
        reporter.event("error", message=message, step=step)
    if status in ("stopped", "paused"):
        reporter.event("stopped", reason=message, step=step)
    reporter.event("status", status=status, message=message, step=step)
    reporter.log(f"{status}: {message}")
    if hasattr(reporter, "close"):
        reporter.close()
    return Outcome(status, message, user_error)


def describe_failure(e: Exception) -> str:
    from .user_errors import USER_ERRORS

    if isinstance(e, USER_ERRORS):
        return str(e)
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError) or any(mark in str(e).lower() for mark in OOM_MARKS):
        return f"out of memory ({str(e).strip() or type(e).__name__}). {OOM_ADVICE}"
    return text
