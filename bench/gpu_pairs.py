"""Paired GPU measurements, each part in one process with its cases in interleaved rounds (issue 8).

    python3 bench/gpu_pairs.py                       # on the GPU machine (see ../shared/tools/device-mlx-cuda.md)
    .venv/bin/python bench/gpu_pairs.py --small      # a quick check of every code path on CPU

On the H200 the same compiled step varied by up to 50% between processes (bench/RESULTS.md), which hides the 10%
questions of issue 8. Here the cases being compared share one process and run in rounds (A B C, A B C, ...), and
each case is reported as its median over the rounds and as its median ratio to the round's reference case.

Parts (same model and data as gpu_bench.py / gpu_memory.py: 0.5B Qwen2 shape, random bf16 weights, rank 8):
  loop   the real `Trainer.loop` (the CLI's loop: a fresh compiled step, reports every 10 steps) with no memory
         limit, at RUN_AHEAD_MEMORY factors (x step 1's peak) and under fixed memory limits, against the bare
         compiled step on the same batches (pipelined; no limit, and the middle fixed limit): uniform rows and
         mixed lengths. In one process step 1 runs on kernels already built, so its peak (the factors' base)
         is higher than in a fresh CLI process; the fixed limits stand in for the CLI's.
  lora7  where the all-linear step's extra time goes: q/v vs all 7 modules, as the full step, the gradients
         alone (no optimizer update) and the forward loss alone
  steps  q/v: mlx-lm's compiled step (as its train() builds it) against ours (the engine: the loss through the
         LM head in chunks) and ours with the plain logits loss, on the same token rows, no memory limit
"""

# ruff: noqa: B023  (closures are called at once)
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from gpu_bench import (  # noqa: E402
    ALL7,
    QWEN05,
    SMALL,
    build_mlx_model,
    emit,
    mlx_lm_lora_step,
    ours_compiled_step,
    run_part,
)


def rounds(cases: dict, n: int, reference: str) -> None:
    """Run every case once per round, n rounds; emit each case's per-round results and ratios to `reference`."""
    got: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(n):
        for name, run in cases.items():
            got[name].append(run())
            print(f"round {r} {name}: {json.dumps(got[name][-1])}", flush=True)
    for name, results in got.items():
        ratios = [x["tok_s"] / ref["tok_s"] for x, ref in zip(results, got[reference])]
        emit(case=name, tok_s=[x["tok_s"] for x in results], peak_gb=[x["peak_gb"] for x in results],
             ratio=ratios, reference=reference)


def pipelined(step, arrays: list, state, tokens: int, warmup: int = 3) -> dict:
    """Tokens/s and peak of `step` over `arrays`, enqueued back to back (the bare step, no host waits)."""
    import mlx.core as mx

    for x in arrays[:warmup]:
        mx.eval(step(*x), state)
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for x in arrays:
        mx.async_eval(step(*x), state)
    mx.eval(state)
    return {"tok_s": tokens * len(arrays) / (time.perf_counter() - tic), "peak_gb": mx.get_peak_memory() / 1e9}


# ---- loop: Trainer.loop vs the bare step ---------------------------------------------------------------------

def part_loop(a) -> None:
    import mlx.core as mx

    import lora_app.trainer as tm
    from lora_app.config import RunConfig

    default_limit = mx.get_memory_limit()
    work = Path(a.work)
    cfg = RunConfig.from_flat(dict(
        model=str(work / "model"), data=str(work / a.data), batch_size=a.batch, iters=a.steps, rank=8, alpha=16,
        learning_rate=1e-5, max_seq_length=1024, batching="packed", steps_per_report=10, steps_per_eval=0,
        save_every=10**6))
    run_dir = work / "pairs" / a.data
    run_dir.mkdir(parents=True, exist_ok=True)
    tr = tm.Trainer(run_dir, cfg)
    tr.started = time.perf_counter()
    tr.setup()
    tr.save = lambda step: None  # the loop's final save is not training; keep the run folder small
    batches = [tr.plan.batch_at(k) for k in range(1, tr.total_steps)]  # the loop's steady steps: 2..total
    tokens = statistics.mean(b.trained_tokens for b in batches)
    arrays = [tm.batch_arrays(b) for b in batches]

    def bare(limit_gb: float | None = None) -> dict:
        mx.set_memory_limit(int(limit_gb * 1e9) if limit_gb else default_limit)
        step, state = tr.compiled_step()
        tr.model.train()
        return pipelined(step, arrays, state, tokens)

    def bare_fresh_arrays() -> dict:
        """The bare step, its input arrays made from host data one step ahead (the loop's old pattern)."""
        mx.set_memory_limit(default_limit)
        step, state = tr.compiled_step()
        tr.model.train()
        for b in batches[:3]:
            mx.eval(step(*tm.batch_arrays(b)), state)
        mx.reset_peak_memory()
        tic = time.perf_counter()
        for b in batches:
            mx.async_eval(step(*tm.batch_arrays(b)), state)
        mx.eval(state)
        return {"tok_s": tokens * len(batches) / (time.perf_counter() - tic), "peak_gb": mx.get_peak_memory() / 1e9}

    def loop(factor: float | None = None, limit_gb: float | None = None) -> dict:
        """The real loop: at a RUN_AHEAD_MEMORY factor, or under a fixed memory limit, or neither."""
        mx.set_memory_limit(int(limit_gb * 1e9) if limit_gb else default_limit)
        tm.RUN_AHEAD_MEMORY = factor or 1e6  # a huge factor: bound_run_ahead keeps the limit set here
        tr.progress = tm.Progress()
        events = run_dir / "events.jsonl"
        start = events.stat().st_size if events.exists() else 0
        tr.loop()
        with open(events, encoding="utf-8") as f:
            f.seek(start)
            new = [json.loads(line) for line in f]
        first = next(e for e in new if e["event"] == "first_step")
        last = [e for e in new if e["event"] == "train"][-1]
        return {"tok_s": (last["trained_tokens"] - first["tokens"]) / (last["time"] - first["time"]),
                "peak_gb": last["peak_memory_gb"]}

    limits = a.uniform_limits if a.data == "uniform" else a.mixed_limits
    cases = {"bare compiled step": bare, f"bare compiled step, limit {limits[len(limits) // 2]} GB":
             partial(bare, limit_gb=limits[len(limits) // 2]),
             "bare compiled step, input arrays made per step": bare_fresh_arrays,
             "Trainer.loop, no memory limit": loop}
    for f in a.factors:
        cases[f"Trainer.loop, run-ahead {f}x"] = partial(loop, f)
    for limit in limits:
        cases[f"Trainer.loop, limit {limit} GB"] = partial(loop, limit_gb=limit)
    rounds(cases, a.rounds, "bare compiled step")


# ---- lora7: q/v vs all 7 modules, split into forward / gradients / update ------------------------------------

def part_lora7(a) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from lora_app.batching import Batch
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.trainer import batch_arrays, loss_fn

    config = SMALL if a.small else QWEN05
    B, T = a.batch, a.seq
    rng = np.random.default_rng(0)
    arrays = [batch_arrays(Batch(rng.integers(3, 500, (B, T + 1)).astype(np.int32), np.ones((B, T), np.float32)))
              for _ in range(a.steps)]
    cases = {}
    for tag, modules in (("q/v", ["q_proj", "v_proj"]), ("all 7", ALL7)):
        model = build_mlx_model(a, config)
        apply_lora(model, LoraConfig(modules=modules), seed=0)
        step, state = ours_compiled_step(model)
        lvg = nn.value_and_grad(model, loss_fn)
        plain = [model.state, mx.random.state]
        grads = mx.compile(lambda *b, lvg=lvg: lvg(model, *b), inputs=plain, outputs=plain)
        forward = mx.compile(partial(loss_fn, model), inputs=plain, outputs=plain)
        cases[f"{tag}: step"] = partial(pipelined, step, arrays, state, B * T)
        cases[f"{tag}: gradients only"] = partial(pipelined, grads, arrays, plain, B * T)
        cases[f"{tag}: forward only"] = partial(pipelined, forward, arrays, plain, B * T)
    order = [f"{tag}: {what}" for what in ("step", "gradients only", "forward only") for tag in ("q/v", "all 7")]
    rounds({name: cases[name] for name in order}, a.rounds, "q/v: step")


# ---- steps: our compiled step against mlx-lm's, and what the chunked head loss costs in it ---------------------

def part_steps(a) -> None:
    import mlx.core as mx
    import numpy as np

    from lora_app.batching import Batch
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.trainer import batch_arrays

    config = SMALL if a.small else QWEN05
    B, T = a.batch, a.seq
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 500, (B, T + 1)).astype(np.int32) for _ in range(a.steps)]
    ours_arrays = [batch_arrays(Batch(r, np.ones((B, T), np.float32))) for r in rows]
    lengths = mx.array([[0, T]] * B)  # mlx-lm's batches: each row's [offset, length] of tokens that carry loss
    theirs_arrays = [(mx.array(r), lengths) for r in rows]

    theirs, theirs_state = mlx_lm_lora_step(a, config, ["q_proj", "v_proj"])
    cases = {"mlx-lm compiled step": partial(pipelined, theirs, theirs_arrays, theirs_state, B * T)}
    for name, plain_loss in (("ours (head loss in chunks)", False), ("ours, plain logits loss", True)):
        ours = build_mlx_model(a, config)
        apply_lora(ours, LoraConfig(modules=["q_proj", "v_proj"]), seed=0)
        step, state = ours_compiled_step(ours, plain_loss=plain_loss)
        cases[name] = partial(pipelined, step, ours_arrays, state, B * T)
    rounds(cases, a.rounds, "mlx-lm compiled step")


# ---- parent: run the parts, print the tables -----------------------------------------------------------------

PARTS = {"loop": part_loop, "lora7": part_lora7, "steps": part_steps}


def table(results: list[dict], title: str) -> str:
    lines = [f"**{title}** (reference: {results[0]['reference']})", "",
             "| case | tokens/s (median) | tokens/s (each round) | ratio to reference (median; each) | peak GB |",
             "|---|---:|---|---|---:|"]
    for r in results:
        lines.append(f"| {r['case']} | {statistics.median(r['tok_s']):,.0f} | "
                     f"{', '.join(f'{x / 1000:.1f}k' for x in r['tok_s'])} | "
                     f"{statistics.median(r['ratio']):.3f}; {', '.join(f'{x:.2f}' for x in r['ratio'])} | "
                     f"{max(r['peak_gb']):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=list(PARTS), help="run one part in this process")
    ap.add_argument("--parts", default="lora7,loop")
    ap.add_argument("--data", default="uniform", help="loop part: uniform or mixed")
    ap.add_argument("--loop-data", default="uniform,mixed")
    ap.add_argument("--factors", default="1.1", help="loop part: RUN_AHEAD_MEMORY values (none: '')")
    ap.add_argument("--uniform-limits", default="8.8,9.4,10.0", help="loop part: fixed memory limits (GB)")
    ap.add_argument("--mixed-limits", default="16.0,17.5,19.0", help="loop part: fixed memory limits (GB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny shapes: check the code paths on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", default="/tmp/gpu_bench", help="gpu_memory.py --prep's folder (model and data)")
    ap.add_argument("--part-timeout", type=int, default=300)
    a = ap.parse_args()
    flags = ["--factors", a.factors, "--uniform-limits", a.uniform_limits, "--mixed-limits", a.mixed_limits,
             "--rounds", str(a.rounds), "--batch", str(a.batch), "--seq", str(a.seq),
             "--steps", str(a.steps), "--work", a.work] + (["--small"] if a.small else [])
    a.factors = [float(f) for f in a.factors.split(",") if f]
    a.uniform_limits = [float(x) for x in a.uniform_limits.split(",") if x]
    a.mixed_limits = [float(x) for x in a.mixed_limits.split(",") if x]
    if a.small:
        a.batch, a.seq, a.steps, a.rounds = 2, 64, 12, min(a.rounds, 2)
        a.work = a.work + "_small"
    if a.part:
        PARTS[a.part](a)
        return
    out = []
    for part in a.parts.split(","):
        for data in a.loop_data.split(",") if part == "loop" else ["-"]:
            cmd = [sys.executable, __file__, "--part", part, *flags] + (["--data", data] if part == "loop" else [])
            tic = time.perf_counter()
            text, rc, got = run_part(cmd, a.part_timeout)
            print(f"[{part} {data}] rc={rc} {time.perf_counter() - tic:.0f}s", flush=True)
            if rc != 0 or not got:
                print("\n".join(text.splitlines()[-20:]), flush=True)
            if got:
                out.append(table(got, f"{part}" + (f", {data} data" if part == "loop" else "")))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
