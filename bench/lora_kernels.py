"""Where the all-linear LoRA step's extra time goes, kernel by kernel, and low-rank paths that may cut it (issue 8).

    python3 bench/lora_kernels.py                    # on the GPU machine (see ../shared/tools/device-mlx-cuda.md)
    .venv/bin/python bench/lora_kernels.py --small   # a quick check of every code path on CPU

Same model and batch as gpu_bench.py (0.5B Qwen2 shape, random bf16 weights, batch 8 x 512, rank 8).
Parts, each in its own process:
  gemms  every matmul a LoRA module adds, timed alone for each of the 7 module shapes, next to the base layer's
         own matmuls: the forward x A and h B, the add (or addmm), and the backward g B^T, h^T g, x^T dh, dh A^T.
         (Splitting the two weight-gradient products over the tokens by hand was tried and was no faster: cuBLAS
         already picks split-K kernels for them.)
  update the step's parts: gradients alone and the full step with AdamW and with plain SGD, q/v and all 7
         modules (rounds; reference: q/v full step). Gradient-only steps do not depend on each other (no weight
         changes), so the GPU can overlap them: their gap to the full step is not the optimizer's cost.
  profile the full step (q/v, all 7; each path in --paths) under PyTorch's CUDA profiler (CUPTI sees MLX's
         kernels too): GPU time per step by kernel and kernels per step, against the wall time per step
  buffers the full step (q/v and all 7; each path in --paths) in processes with each environment in --envs
         (default: MLX_MAX_OPS_PER_BUFFER at each value of --ops; MLX's CUDA backend puts that many kernels in
         one CUDA graph, 20 by default), the processes interleaved (env 1, env 2, ..., env 1, env 2, ...), each
         case's median over rounds and processes. E.g. --envs "default;MLX_USE_CUDA_GRAPHS=0" compares MLX's
         CUDA graphs with plain kernel launches.
  paths  the full compiled step, q/v and all 7 modules, for each low-rank path in PATHS, in interleaved rounds
         (gpu_pairs.rounds); reference: q/v on the first path.
Paths: "engine" is lora_layer.py as it is; "bf16 add" is the engine before it used addmm (scale applied to the
[tokens, out] product, then a separate add); "bf16 params" is the engine with A and B stored in bf16 (no casts:
what bf16 copies written by the optimizer could save at most; not numerically what the engine should train).
"""

# ruff: noqa: B023  (closures are called at once)
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from functools import partial
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from gpu_bench import ALL7, QWEN05, SMALL, build_mlx_model, emit, ours_compiled_step, run_part  # noqa: E402
from gpu_pairs import pipelined, rounds, table  # noqa: E402

RANK = 8
TARGETS = (("q/v", ["q_proj", "v_proj"]), ("all 7", ALL7))  # (tag, modules) of every step compared


def lora_step(a, modules: list[str], bf16_params: bool = False) -> tuple:
    """A fresh model with LoRA on `modules` and the engine's compiled step for it: (model, step, state). The step
    traces its low-rank path at its first call: make that call inside low_rank_path(...) to pick one.
    bf16_params: A and B (and so AdamW's state) stored in bf16, which drops the casts the engine's float32
    parameters cost in every step (forward and gradient): an upper bound on keeping bf16 copies of them."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora

    model = build_mlx_model(a, SMALL if a.small else QWEN05)
    apply_lora(model, LoraConfig(modules=modules), seed=0)
    if bf16_params:
        model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.trainable_parameters()))
    return (model, *ours_compiled_step(model))


def module_shapes(c: dict) -> dict[str, tuple[int, int]]:
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def random_batches(a) -> list:
    """a.steps batches of random tokens, [a.batch, a.seq + 1], every target counted: the steps' inputs."""
    import numpy as np

    from lora_app.batching import Batch
    from lora_app.trainer import batch_arrays

    rng = np.random.default_rng(0)
    shape = (a.batch, a.seq + 1)
    return [batch_arrays(Batch(rng.integers(3, 500, shape).astype(np.int32), np.ones((a.batch, a.seq), np.float32)))
            for _ in range(a.steps)]


# ---- gemms ---------------------------------------------------------------------------------------------------

def per_kernel_us(make, k: int) -> float:
    """Microseconds per call of make(i), k calls (distinct operands, so none is merged) evaluated at once."""
    import mlx.core as mx

    for _ in range(2):
        mx.eval([make(i) for i in range(k)])
    tic = time.perf_counter()
    mx.eval([make(i) for i in range(k)])
    return (time.perf_counter() - tic) / k * 1e6


def part_gemms(a) -> None:
    import mlx.core as mx

    c = SMALL if a.small else QWEN05
    n, k, bf = a.batch * a.seq, 4 if a.small else 32, mx.bfloat16
    for name, (d_in, d_out) in module_shapes(c).items():
        x = mx.random.normal((n, d_in)).astype(bf)
        g = mx.random.normal((n, d_out)).astype(bf)
        y = mx.random.normal((n, d_out)).astype(bf)
        w = [mx.random.normal((d_out, d_in)).astype(bf) for _ in range(k)]
        la = [mx.random.normal((d_in, RANK)).astype(bf) for _ in range(k)]
        lb = [mx.random.normal((RANK, d_out)).astype(bf) for _ in range(k)]
        hs = [mx.random.normal((n, RANK)).astype(bf) for _ in range(k)]
        mx.eval(x, g, y, w, la, lb, hs)
        kernels = {
            "base x W^T": lambda i: x @ w[i].T,
            "base g W (dx)": lambda i: g @ w[i],
            "x A": lambda i: x @ la[i],
            "h B": lambda i: hs[i] @ lb[i],
            "y + s h B (add)": lambda i: y + 2.0 * (hs[i] @ lb[i]),
            "addmm(y, h, B)": lambda i: mx.addmm(y, hs[i], lb[i], alpha=2.0),
            "g B^T": lambda i: g @ lb[i].T,
            "h^T g (dB)": lambda i: hs[i].T @ g,
            "x^T dh (dA)": lambda i: x.T @ hs[i],
            "dh A^T (dx)": lambda i: hs[i] @ la[i].T,
        }
        for what, make in kernels.items():
            emit(part="gemms", module=name, shape=[d_in, d_out], kernel=what, us=per_kernel_us(make, k))


# ---- paths ---------------------------------------------------------------------------------------------------

def path_call(path: str):
    """LoRALinear.__call__ for the low-rank path named `path`: "engine" (lora_layer.py as it is), or "bf16 add"
    (the engine before addmm: scale on the [tokens, out] product and a separate add)."""

    from lora_app.lora_layer import LoRALinear

    if path in ("engine", "bf16 params"):  # the latter: the engine's call on bf16 A and B (see path_steps)
        return LoRALinear.__call__
    if path == "bf16 add":
        def call(self, x):
            z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
            return self.linear(x) + (self.scale * z).astype(x.dtype)
        return call
    raise ValueError(f"unknown path {path!r}")


@contextmanager
def low_rank_path(path: str):
    """LoRALinear runs `path` inside the block: compile and run a step's first call (its trace) in it."""
    from lora_app.lora_layer import LoRALinear

    engine = LoRALinear.__call__
    LoRALinear.__call__ = path_call(path)
    try:
        yield
    finally:
        LoRALinear.__call__ = engine


def path_steps(a) -> tuple[dict, dict]:
    """For each target and each path in a.paths, a fresh model's compiled step, traced on that path: (name ->
    a pipelined run of it, name -> its first 3 losses)."""
    arrays, cases, losses = random_batches(a), {}, {}
    for tag, modules in TARGETS:
        for path in a.paths:
            _, step, state = lora_step(a, modules, bf16_params=path == "bf16 params")
            with low_rank_path(path):
                losses[f"{tag}, {path}"] = [float(step(*x)[0]) for x in arrays[:3]]
            cases[f"{tag}, {path}"] = partial(pipelined, step, arrays, state, a.batch * a.seq)
    return cases, losses


def part_paths(a) -> None:
    cases, losses = path_steps(a)
    emit(part="paths_losses", losses=losses)
    rounds(cases, a.rounds, f"q/v, {a.paths[0]}")


# ---- update / profile -----------------------------------------------------------------------------------------

def step_cases(a, modules: list[str]) -> dict:
    """Compiled pieces of one training step for a fresh model with LoRA on `modules`: name -> (fn, state)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from lora_app.trainer import loss_fn

    model, step, state = lora_step(a, modules)
    lvg = nn.value_and_grad(model, loss_fn)
    plain = [model.state, mx.random.state]
    grads = mx.compile(lambda *b: lvg(model, *b), inputs=plain, outputs=plain)
    sgd = optim.SGD(learning_rate=1e-5)
    sgd_state = [model.state, sgd.state, mx.random.state]

    @partial(mx.compile, inputs=sgd_state, outputs=sgd_state)
    def sgd_step(*b):
        (loss, ntoks), g = lvg(model, *b)
        sgd.update(model, g)
        return loss, ntoks

    return {"step": (step, state), "gradients only": (grads, plain), "step, SGD": (sgd_step, sgd_state)}, model


def part_update(a) -> None:
    from mlx.utils import tree_flatten

    B, T = a.batch, a.seq
    arrays = random_batches(a)
    cases = {}
    for tag, modules in TARGETS:
        got, model = step_cases(a, modules)
        for name in ("step", "gradients only", "step, SGD"):
            fn, state = got[name]
            cases[f"{tag}: {name}"] = partial(pipelined, fn, arrays, state, B * T)
        emit(part="update_count", tag=tag, trainable_arrays=len(tree_flatten(model.trainable_parameters())))
    order = [f"{t}: {n}" for n in ("step", "gradients only", "step, SGD")
             for t in ("q/v", "all 7")]
    rounds({name: cases[name] for name in order}, a.rounds, "q/v: step")


def part_profile(a) -> None:
    import mlx.core as mx
    import torch
    from torch.profiler import ProfilerActivity, profile

    arrays = random_batches(a)
    on_gpu = torch.cuda.is_available()  # on a CPU (--small) only the code path is checked: MLX's work is unseen
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    for (tag, modules), path in product(TARGETS, a.paths):
        _, step, state = lora_step(a, modules, bf16_params=path == "bf16 params")
        with low_rank_path(path):
            for x in arrays[:3]:
                mx.eval(step(*x), state)
        n = min(10, len(arrays))
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            tic = time.perf_counter()
            for x in arrays[:n]:
                mx.async_eval(step(*x), state)
            mx.eval(state)
            wall = (time.perf_counter() - tic) / n
        kernels: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == kind:
                kernels.setdefault(e.name, []).append(e.device_time if on_gpu else e.cpu_time)  # microseconds
        busy = sum(sum(v) for v in kernels.values()) / n
        emit(part="profile", tag=f"{tag}, {path}", wall_ms=wall * 1e3, gpu_busy_ms=busy / 1e3,
             launches_per_step=sum(len(v) for v in kernels.values()) / n,
             top=[[k[:90], sum(v) / n / 1e3, len(v) / n] for k, v in
                  sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:30]])


# ---- buffers: kernels per CUDA graph ----------------------------------------------------------------------------

def part_steps(a) -> None:
    """One process of the buffers part: the full step for q/v and all 7 on the paths in a.paths."""
    import os

    cases, _ = path_steps(a)
    for r in range(a.rounds):
        for name, run in cases.items():
            emit(part="steps", env=os.environ.get("LORA_KERNELS_ENV", "default"), case=name, round=r, **run())


def buffers(a, flags: list[str]) -> list[str]:
    import os

    got = []
    for rep in range(a.processes):
        for tag in a.envs:
            settings = {} if tag == "default" else dict(kv.split("=", 1) for kv in tag.split())
            env = dict(os.environ, LORA_KERNELS_ENV=tag, **settings)
            cmd = [sys.executable, __file__, "--part", "steps", *flags]
            text, _, rows = run_part(cmd, a.part_timeout, env)
            print(f"[buffers {tag} process {rep}] {len(rows)} results", flush=True)
            if not rows:
                print("\n".join(text.splitlines()[-15:]), flush=True)
            got += rows
    if not got:
        return []
    names = list(dict.fromkeys(r["case"] for r in got))
    lines = ["**Full step (tokens/s, median over rounds and processes) by environment**", "",
             "| case | " + " | ".join(a.envs) + " |", "|---|" + "---:|" * len(a.envs)]
    for name in names:
        cells = []
        for tag in a.envs:
            xs = [r["tok_s"] for r in got if r["case"] == name and r["env"] == tag]
            cells.append(f"{statistics.median(xs):,.0f} ({min(xs) / 1e3:.0f}-{max(xs) / 1e3:.0f}k)" if xs else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return ["\n".join(lines)]


# ---- parent --------------------------------------------------------------------------------------------------

PARTS = {"gemms": part_gemms, "update": part_update, "profile": part_profile, "paths": part_paths,
         "steps": part_steps}


def gemm_table(rows: list[dict]) -> str:
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    modules = list(dict.fromkeys(r["module"] for r in rows))
    us = {(r["module"], r["kernel"]): r["us"] for r in rows}
    shape = {r["module"]: r["shape"] for r in rows}
    lines = ["| kernel (µs) | " + " | ".join(f"{m} {shape[m][0]}→{shape[m][1]}" for m in modules) + " |",
             "|---|" + "---:|" * len(modules)]
    lines += [f"| {k} | " + " | ".join(f"{us[m, k]:.1f}" for m in modules) + " |" for k in kernels]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=list(PARTS), help="run one part in this process")
    ap.add_argument("--parts", default="profile,gemms,update,paths")
    ap.add_argument("--paths", default="engine;bf16 add",
                    help="low-rank paths to compare, ';'-separated (paths part); the first is the reference")
    ap.add_argument("--ops", default="20,100,200", help="buffers part: MLX_MAX_OPS_PER_BUFFER values")
    ap.add_argument("--envs", help="buffers part: ';'-separated environments, each 'default' or space-separated "
                    "NAME=value settings (overrides --ops)")
    ap.add_argument("--processes", type=int, default=2, help="buffers part: processes per value")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny shapes: check the code paths on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--part-timeout", type=int, default=300)
    a = ap.parse_args()
    flags = ["--paths", a.paths, "--rounds", str(a.rounds), "--batch", str(a.batch),
             "--seq", str(a.seq), "--steps", str(a.steps)] + (["--small"] if a.small else [])
    a.paths = [p.strip() for p in a.paths.split(";") if p.strip()]
    a.envs = ([e.strip() for e in a.envs.split(";") if e.strip()] if a.envs else
              [f"MLX_MAX_OPS_PER_BUFFER={o}" for o in a.ops.split(",") if o])
    if a.small:
        a.batch, a.seq, a.steps, a.rounds = 2, 64, 6, min(a.rounds, 2)
    if a.part:
        PARTS[a.part](a)
        return
    out = []
    for part in a.parts.split(","):
        if part == "buffers":
            out += buffers(a, flags)
            continue
        cmd = [sys.executable, __file__, "--part", part, *flags]
        tic = time.perf_counter()
        text, rc, got = run_part(cmd, a.part_timeout)
        print(f"[{part}] rc={rc} {time.perf_counter() - tic:.0f}s", flush=True)
        if rc != 0 or not got:
            print("\n".join(text.splitlines()[-20:]), flush=True)
        if part == "gemms" and got:
            out.append("**Kernels a LoRA module adds, alone**\n\n" + gemm_table(got))
        for r in got:
            if r.get("part") == "update_count":
                out.append(f"{r['tag']}: {r['trainable_arrays']} trainable arrays")
            if r.get("part") == "profile":
                out.append(f"**Profile, {r['tag']}**: wall {r['wall_ms']:.1f} ms/step, GPU busy {r['gpu_busy_ms']:.1f} "
                           f"ms/step, {r['launches_per_step']:.0f} kernels/step\n\n| kernel | ms/step | calls/step |\n"
                           "|---|---:|---:|\n" + "\n".join(f"| `{k}` | {ms:.2f} | {c:.0f} |" for k, ms, c in r["top"]))
        if part == "update" and [r for r in got if "case" in r]:
            out.append(table([r for r in got if "case" in r], "The step's parts"))
        if part == "paths":
            for r in got:
                if r.get("part") == "paths_losses":
                    out.append("First 3 losses per case: " + json.dumps(r["losses"]))
            steps = [r for r in got if "case" in r]
            if steps:
                out.append(table(steps, "Full step by low-rank path"))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
