"""Peak memory and first-step time of our training loop on the GPU: candidate fixes side by side, one call.

    python3 bench/gpu_memory.py                      # on the GPU machine (see ../shared/tools/device-mlx-cuda.md)
    .venv/bin/python bench/gpu_memory.py --small     # a quick check of every code path on CPU

Same model and data as bench/gpu_bench.py (0.5B Qwen2 shape, random bf16 weights, batch 8, rank 8 on q/v,
uniform rows of 512 tokens or mixed lengths 10-1000 packed into rows of 1024). Every variant runs in its own
process through a real `Trainer.setup()` (the CLI's path) and then a loop like `Trainer.loop` with one thing
changed; it prints one `RESULT {json}` line and the parent prints a table:
peak = mx.get_peak_memory() from just before the first step to the end (what the CLI's train events report),
first step = the first step's batch + trace + evaluation, split into its parts, steady = tokens/s after step 1.

Loop modes ("how far the host may run ahead of the GPU"):
  ahead      the old Trainer.loop: async_eval every step, host sync only at reports (every 10 steps)
  wait_prev  enqueue step k, then wait until step k-1 is finished (one step queued behind the running one)
  one        build step k+1's arrays while step k runs, wait for step k, then enqueue step k+1
  wait_loss  before enqueueing step k+1 wait for step k's loss (its forward pass), not its update
  sync       mx.eval after every step (mlx-lm's train() pattern)
  mlxlm      mlx-lm's own step (its LoRA layers, default_loss, iterate_batches) synced every step: the reference
"""

# ruff: noqa: F821
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

# name: (data, loop mode, options); options: limit (GB memory limit), factor (limit = factor x step 1's peak),
# clear (clear_cache at reports),
# loss ("bool": bool weights, no maximum), ptx ("cold": a fresh MLX_PTX_CACHE_DIR for this process),
# lora ("float32": mlx-lm's LoRALinear, the float32 low-rank path, instead of ours), lr, seed,
# head ("plain": the loss through the whole logits tensor instead of head_loss's chunks), tight (step 1 under a
# memory limit at the memory in use before it, so MLX waits for running work before each new allocation: step 1's
# peak is then what the step needs, not what the host allocated ahead of the GPU; Trainer.loop does this)
VARIANTS = {
    "mlxlm cold": ("uniform", "mlxlm", {"ptx": "cold"}),
    "ahead cold": ("uniform", "ahead", {"ptx": "cold"}),
    "mlxlm": ("uniform", "mlxlm", {}),
    "ahead": ("uniform", "ahead", {}),
    "sync": ("uniform", "sync", {}),
    "wait_prev": ("uniform", "wait_prev", {}),
    "one": ("uniform", "one", {}),
    "wait_loss": ("uniform", "wait_loss", {}),
    "ahead+bool loss": ("uniform", "ahead", {"loss": "bool"}),
    "ahead+clear_cache": ("uniform", "ahead", {"clear": True}),
    "ahead+limit 11 GB": ("uniform", "ahead", {"limit": 11}),
    "ahead+limit 1.25x step 1": ("uniform", "ahead", {"factor": 1.25}),
    "ahead+limit 1.1x step 1": ("uniform", "ahead", {"factor": 1.1}),
    "mixed ahead+limit 1.25x step 1": ("mixed", "ahead", {"factor": 1.25}),
    "mixed ahead+limit 1.1x step 1": ("mixed", "ahead", {"factor": 1.1}),
    "ahead+limit 1.0x step 1": ("uniform", "ahead", {"factor": 1.0}),
    "mixed ahead+limit 1.0x step 1": ("mixed", "ahead", {"factor": 1.0}),
    "ahead+limit 1.05x step 1": ("uniform", "ahead", {"factor": 1.05}),
    "mixed ahead+limit 1.05x step 1": ("mixed", "ahead", {"factor": 1.05}),
    "ahead+limit 1.1x step 1 (float32 LoRA path)": ("uniform", "ahead", {"factor": 1.1, "lora": "float32"}),
    "mixed ahead+limit 1.1x step 1 (float32 LoRA path)": ("mixed", "ahead", {"factor": 1.1, "lora": "float32"}),
    "ahead+limit 1.1x step 1 (plain logits loss)": ("uniform", "ahead", {"factor": 1.1, "head": "plain"}),
    "mixed ahead+limit 1.1x step 1 (plain logits loss)": ("mixed", "ahead", {"factor": 1.1, "head": "plain"}),
    "ahead+limit 1.5x step 1": ("uniform", "ahead", {"factor": 1.5}),
    "mixed ahead+limit 1.5x step 1": ("mixed", "ahead", {"factor": 1.5}),
    "tight step 1 then 1.1x": ("uniform", "ahead", {"tight": True, "factor": 1.1}),
    "tight step 1 then 1.1x (plain logits loss)": ("uniform", "ahead", {"tight": True, "factor": 1.1, "head": "plain"}),
    "mixed tight step 1 then 1.1x": ("mixed", "ahead", {"tight": True, "factor": 1.1}),
    "mixed tight step 1 then 1.1x (plain logits loss)": ("mixed", "ahead", {"tight": True, "factor": 1.1,
                                                                        "head": "plain"}),
    "tight step 1 then 1.3x": ("uniform", "ahead", {"tight": True, "factor": 1.3}),
    "mixed tight step 1 then 1.3x": ("mixed", "ahead", {"tight": True, "factor": 1.3}),
    "tight step 1 then 1.6x": ("uniform", "ahead", {"tight": True, "factor": 1.6}),
    "mixed tight step 1 then 1.6x": ("mixed", "ahead", {"tight": True, "factor": 1.6}),
    # loss curves at a learning rate that moves them in 40 steps: bf16 vs float32 LoRA path, chunked vs plain
    # logits loss, and a second seed of the float32 path for the run-to-run spread
    "curve lr 2e-4": ("uniform", "ahead", {"factor": 1.1, "lr": 2e-4}),
    "curve lr 2e-4 (plain logits loss)": ("uniform", "ahead", {"factor": 1.1, "lr": 2e-4, "head": "plain"}),
    "curve lr 2e-4 (float32 LoRA path)": ("uniform", "ahead", {"factor": 1.1, "lr": 2e-4, "lora": "float32"}),
    "curve lr 2e-4 (float32 LoRA path; seed 1)": ("uniform", "ahead", {"factor": 1.1, "lr": 2e-4,
                                                                       "lora": "float32", "seed": 1}),
    "one+bool loss": ("uniform", "one", {"loss": "bool"}),
    "mixed ahead": ("mixed", "ahead", {}),
    "mixed one": ("mixed", "one", {}),
    "mixed wait_prev": ("mixed", "wait_prev", {}),
}


def emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def prep(a) -> None:
    from gpu_bench import make_data

    make_data(argparse.Namespace(**{**vars(a), "max_len": 120 if a.small else 1000}))


def bool_loss(model, tokens, weights, segments=None, head=None):
    """loss_fn with a bool weights mask and no maximum(ntoks, 1): mlx-lm's default_loss arithmetic."""
    import mlx.core as mx
    import mlx.nn as nn

    from lora_app.trainer import forward

    logits = forward(model, tokens[:, :-1], segments)
    mask = weights > 0
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def variant(a) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import lora_app.trainer as tm
    from lora_app.config import RunConfig

    data, mode, opts = VARIANTS[a.variant]
    work = Path(a.work)
    if opts.get("limit"):
        mx.set_memory_limit(int(opts["limit"] * 1e9))
    if opts.get("loss") == "bool":
        tm.loss_fn = bool_loss
    if opts.get("lora") == "float32":  # mlx-lm's layer for the whole process
        from mlx_lm.tuner.lora import LoRALinear

        import lora_app.lora_layer

        lora_app.lora_layer.LoRALinear = LoRALinear
    cfg = RunConfig.from_flat(dict(
        model=str(work / "model"), data=str(work / data), batch_size=a.batch, iters=a.steps, rank=8, alpha=16,
        learning_rate=opts.get("lr", 1e-5), seed=opts.get("seed", 0), max_seq_length=1024, batching="packed",
        steps_per_report=10, steps_per_eval=0, save_every=10**6))
    run_dir = work / "runs" / a.variant.replace(" ", "_").replace(",", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    tic = time.perf_counter()
    tr = tm.Trainer(run_dir, cfg)
    tr.started = tic
    tr.setup()
    if opts.get("head") == "plain":
        tr.head = None
    setup_s = time.perf_counter() - tic
    plan = tr.plan
    times: dict[str, float] = {}
    mx.reset_peak_memory()

    if mode == "mlxlm":
        run_mlxlm(a, tr, times, setup_s)
        return

    t0 = time.perf_counter()
    step_fn, state = tr.compiled_step()
    tr.model.train()
    t1 = time.perf_counter()
    arrays = tm.batch_arrays(plan.batch_at(0))
    if opts.get("tight"):
        mx.set_memory_limit(mx.get_active_memory())
    t2 = time.perf_counter()
    loss, ntoks = step_fn(*arrays)
    t3 = time.perf_counter()
    mx.eval(state, loss, ntoks)
    t4 = time.perf_counter()
    times.update(closure=t1 - t0, batch=t2 - t1, trace=t3 - t2, first_eval=t4 - t3)
    first_peak = mx.get_peak_memory()
    curve = [loss.item()]
    if opts.get("factor"):
        mx.set_memory_limit(int(first_peak * opts["factor"]))
    # step 2 timed alone too (a second trace or graph build would show here)
    arrays = tm.batch_arrays(plan.batch_at(1))
    loss, ntoks = step_fn(*arrays)
    mx.eval(state, loss, ntoks)
    times["second_step"] = time.perf_counter() - t4
    curve.append(loss.item())

    def params() -> list:
        return [v for _, v in tree_flatten(tr.model.trainable_parameters())]

    start = time.perf_counter()
    tokens = 0
    losses, tok_sum = [], mx.array(0.0)
    prev, prev_loss = None, None
    nxt = tm.batch_arrays(plan.batch_at(2))
    for k in range(2, a.steps):
        batch = plan.batch_at(k)
        tokens += batch.trained_tokens
        arrays = nxt if mode == "one" else tm.batch_arrays(batch)
        if mode == "one" and prev is not None:
            mx.eval(prev)
        if mode == "wait_loss" and prev_loss is not None:
            mx.eval(prev_loss)
        before = params() if mode == "wait_prev" else None
        loss, ntoks = step_fn(*arrays)
        losses.append(loss)
        tok_sum = tok_sum + ntoks
        mx.async_eval(state, loss, tok_sum)
        if mode == "wait_prev":
            mx.eval(before)
        if mode == "sync":
            mx.eval(state, loss, tok_sum)
        prev, prev_loss = params(), loss
        if mode == "one" and k + 1 < a.steps:
            nxt = tm.batch_arrays(plan.batch_at(k + 1))
        if (k + 1) % 10 == 0 or k + 1 == a.steps:
            mx.eval(state, tok_sum)
            tok_sum.item()
            curve += [v.item() for v in losses]
            losses, tok_sum = [], mx.array(0.0)
            if opts.get("clear"):
                mx.clear_cache()
    dt = time.perf_counter() - start
    emit(variant=a.variant, data=data, steps=a.steps, setup_s=setup_s, **times,
         first_step=times["batch"] + times["trace"] + times["first_eval"], first_peak_gb=first_peak / 1e9,
         peak_gb=mx.get_peak_memory() / 1e9, tok_s=tokens / dt, ms=dt / (a.steps - 2) * 1000,
         losses=[round(v, 5) for v in curve])


def run_mlxlm(a, tr, times: dict, setup_s: float) -> None:
    """mlx-lm's train() step on the same rows: their LoRA layers, default_loss, iterate_batches, eval per step."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from gpu_bench import mlx_lm_compiled_step
    from mlx_lm import load
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.tuner.utils import linear_to_lora_layers

    rows = [(t, 0) for t, _ in tr.data.train]
    del tr
    model, _ = load(str(Path(a.work) / "model"))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0,
                                                     "keys": ["self_attn.q_proj", "self_attn.v_proj"]})
    mx.reset_peak_memory()
    opt = optim.AdamW(learning_rate=1e-5)
    t0 = time.perf_counter()
    step, state = mlx_lm_compiled_step(model, opt)
    model.train()
    batches = iterate_batches(rows, a.batch, 1024, loop=True)
    t1 = time.perf_counter()
    batch, lengths = next(batches)
    t2 = time.perf_counter()
    out = step(batch, lengths)
    t3 = time.perf_counter()
    mx.eval(state, out)
    t4 = time.perf_counter()
    times.update(closure=t1 - t0, batch=t2 - t1, trace=t3 - t2, first_eval=t4 - t3)
    first_peak = mx.get_peak_memory()
    out = step(*next(batches))
    mx.eval(state, out)
    times["second_step"] = time.perf_counter() - t4
    start = time.perf_counter()
    tokens = 0
    for _ in range(2, a.steps):
        batch, lengths = next(batches)
        lvalue, toks = step(batch, lengths)
        mx.eval(state, lvalue, toks)
        tokens += toks.item() - a.batch  # minus the one padding token per row it trains on
    dt = time.perf_counter() - start
    emit(variant=a.variant, data="uniform", steps=a.steps, setup_s=setup_s, **times,
         first_step=times["batch"] + times["trace"] + times["first_eval"], first_peak_gb=first_peak / 1e9,
         peak_gb=mx.get_peak_memory() / 1e9, tok_s=tokens / dt, ms=dt / (a.steps - 2) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=list(VARIANTS))
    ap.add_argument("--prep", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    ap.add_argument("--small", action="store_true", help="tiny shapes: check the code paths on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", default="/tmp/gpu_bench")
    ap.add_argument("--timeout", type=int, default=120)
    a = ap.parse_args()
    if a.small:
        a.batch, a.seq, a.steps = 2, 64, 12
        a.work = a.work + "_small"
    a.iters = a.steps
    if a.prep:
        prep(a)
        return
    if a.variant:
        variant(a)
        return
    t_all = time.perf_counter()
    passed = [x for x in sys.argv[1:] if not x.startswith("--variants")]
    subprocess.run([sys.executable, __file__, "--prep", *passed], check=True, cwd=ROOT)
    print(f"prep {time.perf_counter() - t_all:.0f}s", flush=True)
    warm_ptx = Path(a.work) / "ptx_warm"
    for old in [warm_ptx, *Path(a.work).glob("ptx_cold_*")]:
        shutil.rmtree(old, ignore_errors=True)
    results = []
    for i, name in enumerate(a.variants.split(",")):
        env = dict(os.environ)
        if VARIANTS[name][2].get("ptx") == "cold":
            cold = Path(a.work) / f"ptx_cold_{i}"
            shutil.rmtree(cold, ignore_errors=True)
            env["MLX_PTX_CACHE_DIR"] = str(cold)
        else:  # the kernels the cold runs compiled are the warm cache of the others
            for cold in Path(a.work).glob("ptx_cold_*"):
                shutil.copytree(cold, warm_ptx, dirs_exist_ok=True)
            env["MLX_PTX_CACHE_DIR"] = str(warm_ptx)
        tic = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--variant", name, *passed], capture_output=True,
                                  text=True, timeout=a.timeout, cwd=ROOT, env=env)
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = str(e.stdout or ""), "timeout"
        got = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        results += got
        print(f"[{name}] rc={rc} {time.perf_counter() - tic:.0f}s", flush=True)
        if rc != 0 or not got:
            print("\n".join(out.splitlines()[-15:]), flush=True)
    print(f"total {time.perf_counter() - t_all:.0f}s")
    print(table(results))
    for r in results:
        if "curve" in r["variant"]:
            print(f"losses [{r['variant']}]: {r['losses']}")


def table(results: list[dict]) -> str:
    lines = ["| variant | data | peak (GB) | peak in step 1 (GB) | ms/step | tokens/s (steady) | first step (s) "
             "| = batch + trace + eval | step 2 (s) |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['data']} | {r['peak_gb']:.1f} | {r['first_peak_gb']:.1f} | "
                     f"{r['ms']:.1f} | {r['tok_s']:,.0f} | {r['first_step']:.2f} | "
                     f"{r['batch']:.2f} + {r['trace']:.2f} + {r['first_eval']:.2f} | {r['second_step']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
