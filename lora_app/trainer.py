"""The training loop: one process per run, reporting through the run folder.

Reuses mlx-lm's pieces (LoRALinear, average_gradients, grad_checkpoint, the compiled-step pattern) but owns
the loop, so it can report every N steps without a host sync per step, stop or pause gracefully, resume
exactly, keep the best adapter, probe samples, and end with a plain message on NaN or out-of-memory.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import runs
from .adapters import adapter_config, save_adapter
from .batching import Batch, BatchPlan, eval_batches
from .checkpoints import CheckpointError, checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig
from .fileio import remove_temp_files
from .head_loss import Head, cross_entropy_sum, find_head
from .lora import adapter_tensors, apply_lora, trainable_parameter_count

# The memory limit set after step 1 bounds how far the host encodes ahead of the GPU: step 1's peak plus a headroom
# of RUN_AHEAD_MEMORY - 1 times that peak, and at least RUN_AHEAD_MIN_HEADROOM bytes. Step 1 itself runs under a
# limit at the memory in use before it, so its peak is what a step needs (with the loss's head in chunks, less than
# the host would allocate ahead). On an H200 (0.5B model, batch 8; bench/RESULTS.md) speed followed the absolute
# headroom: uniform rows through the CLI ran at 65-118k tokens/s with none, 96-103k with 0.4 GB, 108-122k with
# 0.8 GB, 148k unbounded (6 GB); 1.1x alone left the chunked step 0.7 GB there (7.85 GB, 90k tokens/s, against
# 106k for the previous engine at 9.15 GB in the same rounds). mlx-lm's train() peaks at 9.9-10.4 GB on those rows
# and 15.6-16.2 GB on mixed lengths, where this engine's step needs ~12.3 GB. 3 and 4 GB of headroom ran no
# faster than 2 GB, each GB adding a GB of peak.
RUN_AHEAD_MEMORY = 1.1
RUN_AHEAD_MIN_HEADROOM = 2e9
OOM_ADVICE = "Try a smaller batch size, a shorter max sequence length, or gradient checkpointing."
# How MLX (Metal, CUDA, CPU malloc) and the C++ runtime word an allocation failure.
OOM_MARKS = ("out of memory", "outofmemory", "insufficient memory", "unable to allocate", "attempting to allocate",
             "failed to allocate", "bad_alloc", "maximum allowed buffer size")


class StopTraining(Exception):
    """Raised inside the loop to end it with a given final status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Progress:
    """Everything besides weights and optimizer state that exact resume needs."""

    step: int = 0
    trained_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    extra: dict = field(default_factory=dict)


# ---- the pieces of a step --------------------------------------------------------------------------------

class SegmentMask:
    """Stands in for a KV cache so an mlx-lm model attends with our mask (packed rows): offset 0, no caching."""

    offset = 0

    def __init__(self, mask: Any):
        self.mask = mask

    def make_mask(self, *args: Any, **kwargs: Any) -> Any:
        return self.mask

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values


def forward(model: Any, inputs: Any, segments: Any = None, hidden_only: bool = False) -> Any:
    """Logits (or with hidden_only, the last hidden states before the LM head); a packed row's sequences (segment
    ids) attend only to themselves, causally."""
    import mlx.core as mx

    cache = None
    if segments is not None:
        n = segments.shape[1]
        causal = mx.arange(n)[:, None] >= mx.arange(n)[None]
        mask = (segments[:, None, :, None] == segments[:, None, None, :]) & causal
        cache = [SegmentMask(mask)] * len(model.layers)
    return (model.model if hidden_only else model)(inputs, cache=cache)


def loss_fn(model: Any, tokens: Any, weights: Any, segments: Any = None, head: Head | None = None,
            differentiable: bool = True) -> tuple[Any, Any]:
    """Mean cross-entropy over the tokens whose weight is 1, and their count. With the model's `head`
    (head_loss.find_head) the step never holds the whole logits tensor or its gradient; `differentiable=False`
    (evaluation) skips the gradient that path computes in the forward pass."""
    import mlx.core as mx
    import mlx.nn as nn

    ntoks = weights.sum()
    if head is None:
        logits = forward(model, tokens[:, :-1], segments)
        ce = (nn.losses.cross_entropy(logits, tokens[:, 1:]) * weights).astype(mx.float32).sum()
    else:
        hidden = forward(model, tokens[:, :-1], segments, hidden_only=True)
        ce = cross_entropy_sum(head, hidden.reshape(-1, hidden.shape[-1]), tokens[:, 1:].reshape(-1),
                               weights.reshape(-1), differentiable)
    return ce / mx.maximum(ntoks, 1), ntoks


def batch_arrays(batch: Batch) -> tuple:
    import mlx.core as mx

    arrays = (mx.array(batch.tokens), mx.array(batch.weights))
    return arrays + ((mx.array(batch.segments),) if batch.segments is not None else ())


def build_optimizer(cfg: RunConfig, total_steps: int) -> Any:
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


def evaluate(model: Any, batches: list[Batch], head: Head | None = None, before_batch: Any = None) -> float:
    """Token-weighted mean loss over the batches (the same masked tokens as training), over all processes.
    `before_batch()` runs before each batch (the trainer's stop check: a long evaluation must not outlast Stop)."""
    import mlx.core as mx

    total, count = mx.array(0.0), mx.array(0.0)
    for batch in batches:
        if before_batch:
            before_batch()
        loss, ntoks = loss_fn(model, *batch_arrays(batch), head=head, differentiable=False)
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    total = mx.distributed.all_sum(total, stream=mx.cpu)
    count = mx.distributed.all_sum(count, stream=mx.cpu)
    return (total / mx.maximum(count, 1)).item()


# ---- the run ---------------------------------------------------------------------------------------------

class Trainer:
    """One training run in one process (or one rank of a distributed run)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, resume: bool = False):
        import mlx.core as mx

        self.run_dir, self.cfg, self.resume = Path(run_dir), cfg, resume
        self.world = mx.distributed.init()
        self.rank, self.size = self.world.rank(), self.world.size()
        self.signal_request: str | None = None
        self.user_error = False
        self.progress = Progress()
        self.resumed_from: str | None = None  # the checkpoint this process started from

    def event(self, kind: str, **fields: Any) -> None:
        if self.rank == 0:
            runs.append_event(self.run_dir, kind, **fields)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # -- set-up --
    def setup(self) -> None:
        import mlx.core as mx

        from .data import load_data
        from .models import blocks_of, load_model, resolve_model

        cfg = self.cfg
        if self.rank == 0:  # leftovers of writes cut short by a crash
            for folder in ("adapters", "best"):
                remove_temp_files(self.run_dir / folder)
        if cfg.train.memory_limit_gb:
            mx.set_memory_limit(int(cfg.train.memory_limit_gb * 1e9))
        self.base_model = resolve_model(cfg.model.model)
        self.model, self.tokenizer = load_model(self.base_model, cfg.model.dequantize)
        self.data = load_data(cfg.data, self.tokenizer, batch_size=cfg.train.batch_size)
        for note in self.data.notes:
            self.event("info", message=note)
        self.targets = apply_lora(self.model, cfg.lora, seed=cfg.train.seed)
        self.head = find_head(self.model)
        self.num_blocks = len(blocks_of(self.model))
        self.adapter_config = adapter_config(cfg.lora, self.targets, self.num_blocks, self.base_model)
        t = cfg.train
        self.plan = BatchPlan(self.data.train, t.batch_size, t.max_seq_length, t.batching, t.seed,
                              self.rank, self.size)
        if t.epochs > 0:
            self.total_steps = max(1, math.ceil(t.epochs * self.plan.steps_per_epoch()))
        else:
            self.total_steps = t.iters
        self.val = eval_batches(self.data.valid, t.batch_size, t.max_seq_length, t.val_batches,
                                self.rank, self.size)
        self.optimizer = build_optimizer(cfg, self.total_steps)
        self.optimizer.init(self.model.trainable_parameters())
        if self.resume:
            self.restore()
        if cfg.lora.init_adapter and self.progress.step == 0:  # a resumed run's checkpoint wins
            self.init_from_adapter()
        if t.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(self.model.layers[0])
        n = trainable_parameter_count(self.model)
        self.event("info", message=f"trainable parameters: {n:,} ({len(self.targets.module_paths())} modules); "
                                   f"{self.plan.steps_per_epoch()} steps per epoch; {self.total_steps} steps",
                   trainable_params=n, steps_per_epoch=self.plan.steps_per_epoch(),
                   data_format=self.data.format)
        self.check_memory(n)

    def check_memory(self, trainable: int) -> None:
        """Warn before the first step when the estimate exceeds what the machine (or the limit) gives."""
        from .memory import check_model

        t = self.cfg.train
        # The longest row this data really produces, not max_seq_length: activations grow with the square of it.
        row_length = min(t.max_seq_length, self.plan.row_length())
        line, warning, estimate = check_model(self.model, trainable, t.batch_size, row_length,
                                              t.grad_checkpoint, int(t.memory_limit_gb * 1e9))
        self.event("info", message=line, memory_estimate=estimate)
        if warning:
            self.event("warning", message=warning)
            self.log(f"warning: {warning}")

    def roll_back(self, bad_step: int) -> Path | None:
        """Loss `bad_step` was computed from the weights saved after bad_step - 1, so resuming those repeats it:
        drop checkpoints from bad_step - 1 on and put the newest good one back into adapters/."""
        if self.rank != 0:
            return latest_checkpoint(self.run_dir)
        from .checkpoints import discard_from

        last = discard_from(self.run_dir, bad_step - 1)
        folder = self.run_dir / "adapters"
        if last is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            weights, _, state = load_checkpoint(last)
            save_adapter(self.model, folder, {**self.adapter_config, "step": state["step"]}, weights)
        return last

    def restore(self) -> None:
        """Load the newest checkpoint that reads back whole; an unreadable one (a disk fault) is skipped. When
        checkpoints exist and none can be read, stop before anything is written: starting again from step 0
        would overwrite the run's adapters."""
        from mlx.utils import tree_flatten, tree_unflatten

        saved, problems = checkpoint_dirs(self.run_dir), []
        for checkpoint in reversed(saved):
            try:
                adapters, optimizer_state, state = load_checkpoint(checkpoint)
                break
            except Exception as e:  # noqa: BLE001 - any read failure: fall back to the one before
                why = " ".join(str(e).split()) or type(e).__name__
                problems.append(f"{checkpoint.name}: {why}")
                self.event("warning", message=f"checkpoint {checkpoint.name} cannot be read ({why}); "
                                              "trying an older one")
        else:
            if saved:
                raise CheckpointError(f"cannot resume {self.run_dir.name}: none of its {len(saved)} checkpoint(s) "
                                      f"can be read ({'; '.join(problems)}); nothing was changed")
            return  # nothing saved yet: start from the beginning
        self.model.load_weights(list(adapters.items()), strict=False)
        # Fill the freshly initialised state tree leaf by leaf, so its structure stays what compile captured.
        flat = dict(tree_flatten(optimizer_state))
        current = tree_flatten(self.optimizer.state)
        self.optimizer.state = tree_unflatten([(k, flat.get(k, v)) for k, v in current])
        self.progress = Progress(step=state["step"], trained_tokens=state.get("trained_tokens", 0),
                                 best_val_loss=state.get("best_val_loss"), best_step=state.get("best_step"),
                                 evals_since_best=state.get("evals_since_best", 0))
        self.resumed_from = checkpoint.name
        self.event("info", message=f"resumed from {checkpoint.name}", step=self.progress.step)

    def init_from_adapter(self) -> None:
        """Start from an existing adapter's weights (continue training it); a mismatch ends the run here."""
        from .adapters import init_from_adapter

        folder, warnings = init_from_adapter(self.model, self.cfg.lora.init_adapter, self.cfg.lora, self.targets,
                                             self.base_model)
        for warning in warnings:
            self.event("warning", message=warning)
            self.log(f"warning: {warning}")
        self.event("info", message=f"starting from the adapter in {folder}", init_adapter=str(folder))

    def host_names(self, width: int = 64) -> list[str]:
        """Every rank's host name, in rank order (for the `running` event): each rank fills its own row of
        a zero matrix and all_sum gives every rank the whole table."""
        import socket

        import mlx.core as mx

        name = socket.gethostname().encode("utf-8")[:width]
        if self.size == 1:
            return [name.decode("utf-8", "replace")]
        rows = [[0] * width for _ in range(self.size)]
        rows[self.rank][:len(name)] = list(name)
        table = mx.distributed.all_sum(mx.array(rows, dtype=mx.int32), stream=mx.cpu).tolist()
        return [bytes(b for b in row if b).decode("utf-8", "replace") for row in table]

    # -- the step --
    def compiled_step(self) -> Any:
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.nn.utils import average_gradients

        model, optimizer, clip = self.model, self.optimizer, self.cfg.train.grad_clip
        value_and_grad = nn.value_and_grad(model, partial(loss_fn, head=self.head))
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(*batch: Any) -> tuple[Any, Any]:
            (loss, ntoks), grads = value_and_grad(model, *batch)
            grads = average_gradients(grads)
            if clip:
                grads, _ = optim.clip_grad_norm(grads, clip)
            optimizer.update(model, grads)
            return loss, ntoks

        return step, state

    # -- the loop --
    def run(self) -> str:
        """Train to the end (or a stop) and return the final status."""
        self.install_signal_handlers()
        self.started = time.perf_counter()
        self.event("status", status="starting", total_steps=self.cfg.train.iters)
        try:
            self.setup()
            self.event("status", status="running", total_steps=self.total_steps, step=self.progress.step,
                       world_size=self.size, hosts=self.host_names())
            if self.progress.step == 0 and self.cfg.lora.init_adapter and self.val and self.cfg.train.steps_per_eval:
                self.validate(0)  # the starting adapter's loss: the curve's first point (and its probes)
            elif self.progress.step == 0 and self.cfg.train.probe_prompts:
                self.probe(0)
            self.loop()
            status, message = "done", "training finished"
        except StopTraining as stop:
            status, message = stop.status, stop.message
        except Exception as e:  # noqa: BLE001 - every failure ends as one plain event, not a traceback
            from .user_errors import USER_ERRORS

            status, message = "error", describe_failure(e)
            self.user_error = isinstance(e, USER_ERRORS)
            if not self.user_error:
                traceback.print_exc()  # into train.log, for whoever debugs it
            self.event("error", message=message, step=self.progress.step)
        if status in ("stopped", "paused"):
            self.event("stopped", reason=message, step=self.progress.step)
        self.event("status", status=status, message=message, step=self.progress.step)
        self.log(f"{status}: {message}")
        return status

    def loop(self) -> None:
        import mlx.core as mx

        t, p = self.cfg.train, self.progress
        self.start_step = p.step + 1  # the first step this process takes
        step_fn, state = self.compiled_step()
        self.model.train()
        losses: list[tuple[int, Any]] = []  # (step, loss) since the last report, read back only then
        tok_sum, window_tokens, window_start, excluded = mx.array(0.0), 0, time.perf_counter(), 0.0
        first_step = True
        upcoming = self.upload(p.step)
        mx.reset_peak_memory()  # the peak the train events report is the training's, not the loading's
        before, first_shape = mx.get_active_memory(), upcoming[0][0].shape
        usual_limit = self.tighten_for_step_1()
        while p.step < self.total_steps:
            step = p.step + 1
            if self.cfg.lora.dropout > 0:
                mx.random.seed(t.seed * 1_000_003 + step)  # dropout masks depend on the step only: exact resume
            if not upcoming:  # right after a report's sync (or every 64 steps of a longer report window)
                upcoming = self.upload(p.step)
            loss, ntoks = step_fn(*upcoming.popleft())
            losses.append((step, loss))
            tok_sum = tok_sum + ntoks
            # No host sync per step (run-ahead bounded by memory); values are read back at reports only.
            mx.async_eval(state, loss, tok_sum)
            p.step = step
            if first_step:  # the first step includes loading and compiling: time it apart, count it apart
                mx.eval(state, tok_sum)
                self.bound_run_ahead(before, first_shape, usual_limit)
                first_tokens = int(tok_sum.item())
                self.event("first_step", step=step, seconds=time.perf_counter() - self.started, tokens=first_tokens)
                first_step = False
                window_start = time.perf_counter()
                p.trained_tokens += first_tokens
                tok_sum = mx.array(0.0)
            last = step == self.total_steps
            report = step % t.steps_per_report == 0 or last
            save = step % t.save_every == 0 or last
            evaluate_now = bool(self.val) and t.steps_per_eval > 0 and (step % t.steps_per_eval == 0 or last)
            control = self.control_request()
            if not (report or save or evaluate_now or control):
                continue
            mx.eval(state, tok_sum)
            self.check_finite(losses)
            new_tokens = int(tok_sum.item())
            p.trained_tokens += new_tokens
            window_tokens += new_tokens
            tok_sum = mx.array(0.0)
            if (report or control) and losses:
                self.report_train(losses, window_tokens, time.perf_counter() - window_start - excluded)
                losses, window_tokens, excluded = [], 0, 0.0
            aside = time.perf_counter()  # evaluation and saving do not count as training time
            if evaluate_now:
                self.validate(step)
            if save or control:
                self.save(step)
            if control:
                raise StopTraining(*control)
            if report:
                window_start = time.perf_counter()
            else:
                excluded += time.perf_counter() - aside

    def upload(self, first: int) -> deque:
        """The input arrays of 0-based steps `first` up to the next report (at most 64 steps), made at once.

        Call it where the GPU has just been waited for. Making an array from host data can synchronize the
        device in MLX's CUDA backend: its allocator may reuse a cached buffer that last held a kernel's output,
        and moving that buffer to host-visible memory waits for all running work. Made one per step inside the
        loop, the inputs stalled the run-ahead at every step (the loop ran at 86-88% of the bare step on an
        H200, bench/gpu_pairs.py); made here, the wait finds the GPU idle already.
        """
        every = self.cfg.train.steps_per_report
        last = min(self.total_steps, (first // every + 1) * every, first + 64)
        return deque(batch_arrays(self.plan.batch_at(s)) for s in range(first, max(last, first + 1)))

    def tighten_for_step_1(self) -> int | None:
        """On a GPU without a user-set limit, set MLX's memory limit to the memory in use now and return the limit
        it replaces; else None. Under it MLX waits for running work before each new allocation, so step 1's peak
        is what a step needs, not what the host allocated ahead of the GPU: on an H200 the chunked head loss
        needs 6.9 GB (uniform 8 x 512) and 11.9 GB (packed 8 x 1024), while an unbounded step 1 peaked at 8.5 and
        15.0 GB (bench/RESULTS.md). Step 1 took no longer for it there (0.6-0.7 s with a warm kernel cache)."""
        import mlx.core as mx

        if self.cfg.train.memory_limit_gb or mx.default_device().type == mx.cpu:
            return None  # a user's limit stays as set; on the CPU, system memory is the limit already
        return mx.set_memory_limit(mx.get_active_memory())

    def bound_run_ahead(self, before: int, first_shape: tuple, usual_limit: int | None) -> None:
        """Cap the memory the host may fill by encoding work ahead of the GPU (call right after step 1, with
        tighten_for_step_1's result).

        MLX allocates a kernel's buffers when the host encodes it and frees them only once the GPU has run it. The
        host encodes a whole step in a few ms while the GPU needs ~35 ms for it, so unbounded, the buffers of most
        of a step (and with async_eval, of the next one) are held at once: on an H100 (0.5B model, 8 x 512) 14.8
        GB against the 8.7 GB a step needs. MLX's scheduler waits for running work before encoding more once
        active memory passes the memory limit, so a limit at step 1's peak plus a headroom (RUN_AHEAD_MEMORY)
        bounds this. Too little headroom costs speed: the host then waits for the GPU before most allocations
        and the GPU for the host after. The part above the weights is scaled to the largest batch shape of the
        plan (padded batches grow). A user-set memory_limit_gb is left as it is: that is how a user trades memory
        for the unbounded speed. What the bound still costs (13% on uniform rows on an H200, 2% on mixed lengths)
        comes with MLX's allocator churning at the limit: there a cache miss first returns cached buffers to the
        device pool, so the step allocates and frees a few hundred more times (bench/RESULTS.md, seventh session).
        """
        import mlx.core as mx

        if usual_limit is None:
            return
        rows, width = first_shape  # tokens of step 1: [rows, T + 1]
        biggest = (self.plan.batch_size // self.size) * (self.plan.row_length() + 1)
        grow = max(biggest / max(rows * width, 1), 1.0)
        peak = mx.get_peak_memory()
        headroom = max(peak * (RUN_AHEAD_MEMORY - 1), RUN_AHEAD_MIN_HEADROOM)
        want = int(before + (peak - before + headroom) * grow)
        mx.set_memory_limit(min(want, usual_limit))  # never above the limit that was there before step 1

    def check_finite(self, losses: list[tuple[int, Any]]) -> None:
        import mlx.core as mx

        bad = next(((step, v) for step, v in ((s, loss.item()) for s, loss in losses) if not math.isfinite(v)), None)
        if self.size > 1:  # all ranks stop together, even if only one saw the bad value
            if mx.distributed.all_sum(mx.array(int(bad is not None)), stream=mx.cpu).item() and bad is None:
                bad = (self.progress.step, float("nan"))
        if bad is None:
            return
        step, value = bad
        if step == self.start_step:  # no update has happened yet: the starting point is at fault, and it is kept
            start = (f"checkpoint {self.resumed_from}" if self.resumed_from else
                     f"the adapter in {self.cfg.lora.init_adapter}" if self.cfg.lora.init_adapter else "the base model")
            message = (f"loss was {value} at step {step}, the first step of this process, before any update: "
                       f"the starting weights ({start}) or the data give a non-finite loss, not the learning rate. "
                       "Nothing was changed.")
        else:
            last = self.roll_back(step)
            kept = f"the last good checkpoint is {last.name}" if last else "no good checkpoint had been saved yet"
            message = (f"loss became {value} at step {step}; {kept}. "
                       f"Lower the learning rate (now {self.cfg.train.learning_rate:g}) or enable "
                       "gradient clipping, then resume or start again.")
        self.event("error", message=message, step=step)
        raise StopTraining("error", message)

    def report_train(self, losses: list[tuple[int, Any]], tokens: int, elapsed: float) -> None:
        import mlx.core as mx

        loss = sum(v.item() for _, v in losses) / max(len(losses), 1)
        loss = mx.distributed.all_sum(mx.array(loss), stream=mx.cpu).item() / self.size
        tokens = int(mx.distributed.all_sum(mx.array(tokens), stream=mx.cpu).item())
        self.event("train", step=self.progress.step, loss=loss,
                   learning_rate=float(self.optimizer.learning_rate.item()),
                   tokens_per_second=tokens / max(elapsed, 1e-9), trained_tokens=self.progress.trained_tokens,
                   peak_memory_gb=mx.get_peak_memory() / 1e9)
        self.log(f"step {self.progress.step}/{self.total_steps} loss {loss:.4f} "
                 f"{tokens / max(elapsed, 1e-9):.0f} tok/s")

    def validate(self, step: int) -> None:
        self.model.eval()
        val_loss = evaluate(self.model, self.val, self.head, before_batch=partial(self.stop_if_asked, step))
        self.model.train()
        self.event("val", step=step, val_loss=val_loss)
        self.log(f"step {step} validation loss {val_loss:.4f}")
        p, t = self.progress, self.cfg.train
        if p.best_val_loss is None or val_loss < p.best_val_loss - t.early_stop_min_delta:
            p.best_val_loss, p.best_step, p.evals_since_best = val_loss, step, 0
            if self.rank == 0:
                save_adapter(self.model, self.run_dir / "best", {**self.adapter_config, "step": step,
                                                                  "val_loss": val_loss})
            self.event("best", step=step, val_loss=val_loss)
        else:
            p.evals_since_best += 1
        if t.probe_prompts:
            self.probe(step)
        if t.early_stop_patience and p.evals_since_best >= t.early_stop_patience:
            self.save(step)
            raise StopTraining("stopped", f"early stopping: no validation improvement of at least "
                                          f"{t.early_stop_min_delta:g} in {p.evals_since_best} evaluations "
                                          f"(best {p.best_val_loss:.4f} at step {p.best_step})")

    def probe(self, step: int) -> None:
        from .generate import greedy_answer

        self.model.eval()
        for prompt in self.cfg.train.probe_prompts[:5]:
            answer = greedy_answer(self.model, self.tokenizer, prompt, self.cfg.train.probe_max_tokens,
                                   stop=self.stop_wished)
            self.stop_if_asked(step)  # an answer cut short by Stop is not a sample
            self.event("sample", step=step, prompt=prompt, answer=answer)
        self.model.train()

    def save(self, step: int) -> None:
        if self.rank != 0:
            return
        weights = adapter_tensors(self.model)
        save_adapter(self.model, self.run_dir / "adapters", {**self.adapter_config, "step": step}, weights)
        p = self.progress
        path = save_checkpoint(self.run_dir, step, weights, self.optimizer.state, {
            "trained_tokens": p.trained_tokens, "best_val_loss": p.best_val_loss, "best_step": p.best_step,
            "evals_since_best": p.evals_since_best, "total_steps": self.total_steps,
        }, self.cfg.train.keep_checkpoints)
        self.event("checkpoint", step=step, path=str(path.relative_to(self.run_dir)))

    # -- stop / pause --
    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.signal_request = "stop"

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def stop_wished(self) -> bool:
        """This process's own view of a stop or pause request (no agreement between processes: cheap, for
        ending a probe's generation early; stop_if_asked then ends the run on every process together)."""
        return bool(self.signal_request or (self.rank == 0 and runs.read_control(self.run_dir)))

    def stop_if_asked(self, step: int) -> None:
        """End the run now when a stop or pause was asked for during an evaluation or the probes, keeping the
        weights of `step` (at step 0 nothing was trained, so nothing is saved)."""
        control = self.control_request()
        if control:
            if step:
                self.save(step)
            raise StopTraining(*control)

    def control_request(self) -> tuple[str, str] | None:
        """('stopped' | 'paused', message) when a stop or pause was asked for; agreed on by all processes."""
        import mlx.core as mx

        wish = self.signal_request or (runs.read_control(self.run_dir) if self.rank == 0 else None)
        flags = [wish == "stop", wish == "pause"]
        if self.size > 1:  # every rank must leave the loop at the same step
            flags = mx.distributed.all_sum(mx.array(flags, dtype=mx.int32), stream=mx.cpu).tolist()
        code = 1 if flags[0] else 2 if flags[1] else 0
        if code == 1:
            return "stopped", "stopped by request; the adapter is saved"
        if code == 2:
            return "paused", "paused; resume continues from this step"
        return None


def describe_failure(e: Exception) -> str:
    from .user_errors import USER_ERRORS

    if isinstance(e, USER_ERRORS):
        return str(e)
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError) or any(mark in str(e).lower() for mark in OOM_MARKS):
        return f"out of memory ({str(e).strip() or type(e).__name__}). {OOM_ADVICE}"
    return text


def train(run_dir: Path, cfg: RunConfig, resume: bool = False) -> str:
    return Trainer(run_dir, cfg, resume).run()
