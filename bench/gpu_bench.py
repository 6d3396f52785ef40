"""GPU benchmark: our engine vs mlx-lm's trainer vs PyTorch+PEFT on a 0.5B Qwen2-shaped model.

    bash bench/gpu_table.sh                       # on a GPU machine: every part, then the tables (bench/README.md)
    python3 bench/gpu_bench.py --part prep        # only the model and data (bench/out/gpu), for ui_alternating.py
    .venv/bin/python bench/gpu_bench.py --small   # a quick check of every code path on CPU

Random bf16 weights, batch 8 × 512, LoRA rank 8 (alpha 16) on q/v of all 24 blocks. Each part runs in its own
process (MLX and PyTorch do not share the card's memory pool) and prints one `RESULT {json}` line; the parent
prints a markdown table. FLOPs per trained token = 2 × forward (forward + activation gradients; the frozen base
gets no weight gradients): 2 × 2 × (linear parameters incl. the LM head) + causal attention.
"""

# ruff: noqa: B023, F821  (closures are called at once; models are deleted between cases on purpose)
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

QWEN05 = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
              rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768)
SMALL = dict(QWEN05, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


def flops_per_token(c: dict, seq: int) -> float:
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    linear = c["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"])
    linear += h * c["vocab_size"]
    attn = c["num_hidden_layers"] * 2 * seq * h  # QK^T and AV, causal half: 2 · 2 · (seq/2) · h
    return 2 * (2 * linear + attn)


def run_part(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[str, int | str, list[dict]]:
    """Run one part in a process of its own: (its output, its exit status or "timeout", its RESULT records)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    return text, rc, [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]


def timed(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn(sync=True)
    tic = time.perf_counter()
    for _ in range(steps):
        fn(sync=False)
    fn(sync=True, run=False)
    return (time.perf_counter() - tic) / steps


# ---- parts (each in its own process) ----------------------------------------------------------------------

def part_ceiling(a) -> None:
    import mlx.core as mx

    n = 1024 if a.small else 8192
    x = mx.random.normal((n, n)).astype(mx.bfloat16)
    y = mx.random.normal((n, n)).astype(mx.bfloat16)
    for _ in range(3):
        mx.eval(x @ y)
    k = 20
    tic = time.perf_counter()
    outs = [x @ y for _ in range(k)]
    mx.eval(outs)
    dt = (time.perf_counter() - tic) / k
    emit(part="ceiling", tflops=2 * n**3 / dt / 1e12, device=str(mx.default_device()))


def build_mlx_model(a, config: dict):
    import mlx.core as mx
    from mlx_lm.models import qwen2

    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def mlx_lm_compiled_step(model, opt) -> tuple:
    """mlx-lm's training step exactly as its train() builds it (default_loss, value_and_grad, compiled over the
    model, optimizer and random state); returns (step(batch, lengths) -> (loss, tokens), state)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss

    lvg = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (lvalue, toks), grad = lvg(model, batch, lengths)
        opt.update(model, grad)
        return lvalue, toks

    return step, state


def mlx_lm_lora_step(a, config: dict, modules: list[str]) -> tuple:
    """A fresh model with mlx-lm's own LoRA layers (rank 8, scale 2) on `modules` of every block, in training
    mode, and mlx-lm's compiled step for it (AdamW, lr 1e-5): (step(batch, lengths), state)."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = build_mlx_model(a, config)
    model.freeze()
    linear_to_lora_layers(model, config["num_hidden_layers"], {
        "rank": 8, "scale": 2.0, "dropout": 0.0,
        "keys": [f"self_attn.{m}" if m[0] in "qkvo" else f"mlp.{m}" for m in modules]})
    model.train()
    return mlx_lm_compiled_step(model, optim.AdamW(learning_rate=1e-5))


def ours_compiled_step(model, plain_loss: bool = False) -> tuple:
    """The training loop's compiled step (trainer.training_step, default settings) for a model with LoRA applied, in
    training mode; plain_loss: the loss through the whole logits tensor instead of head_loss's chunks."""
    from lora_app.config import RunConfig
    from lora_app.head_loss import find_head
    from lora_app.objective import CrossEntropy
    from lora_app.session import build_optimizer
    from lora_app.trainer import training_step

    cfg = RunConfig()
    optimizer = build_optimizer(cfg, 1000)
    optimizer.init(model.trainable_parameters())
    model.train()
    return training_step(model, optimizer, CrossEntropy(None if plain_loss else find_head(model)), cfg.train.grad_clip)


def part_mlx_steps(a) -> None:
    """Bare compiled steps: mlx-lm's train() step vs ours (padded, packed with a mask), q/v and all 7 modules.

    Each module set's cases are built first and then timed in interleaved rounds (A B C, A B C, ...), each reported
    as its median: timed one after another, a case could land in one of the machine's slow or fast regimes, which
    last seconds on the lent H200. q/v is reported before all 7 are built, so a part cut short
    by its time limit keeps it.
    """

    import mlx.core as mx
    import numpy as np

    from lora_app.batching import Batch
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.objective import batch_arrays

    config = SMALL if a.small else QWEN05
    B, T = a.batch, a.seq
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 500, (B, T + 1)).astype(np.int32)
    weights = np.ones((B, T), np.float32)
    seg = np.repeat(np.arange(4), T // 4)[None].repeat(B, 0).astype(np.int32)

    for modules in (["q_proj", "v_proj"], ALL7):
        tag = "q/v" if len(modules) == 2 else "all 7"
        cases = {}  # name -> (call, state)
        their_step, state = mlx_lm_lora_step(a, config, modules)  # mlx-lm: the step exactly as train() builds it
        batch, lengths = mx.array(tokens), mx.array([[0, T]] * B)
        cases[f"mlx-lm compiled step, {tag}"] = (partial(their_step, batch, lengths), state)

        # ours: trainer.training_step on our batches; our LoRA layer (bf16 low-rank path) and mlx-lm's (float32)
        variants = [("padded/causal", Batch(tokens, weights), False), ("padded/causal, float32 LoRA path",
                                                                        Batch(tokens, weights), True)]
        if tag == "q/v":
            variants.append(("packed, 4 seqs/row (mask)", Batch(tokens, weights, seg), False))
        for name, b, float32_path in variants:
            model = build_mlx_model(a, config)
            with float32_lora_path(float32_path):
                apply_lora(model, LoraConfig(modules=modules), seed=0)
            step, state = ours_compiled_step(model)
            cases[f"ours compiled step, {tag}, {name}"] = (partial(step, *batch_arrays(b)), state)

        got = {name: [] for name in cases}
        for _ in range(a.rounds):
            for name, (call, state) in cases.items():
                got[name].append(time_case(call, state, a.steps))
        for name, runs in got.items():
            ms = statistics.median(r[0] for r in runs) * 1000
            emit(part="mlx_step", name=name, ms=ms, tok_s=B * T / ms * 1000, peak_gb=max(r[1] for r in runs),
                 tok_s_rounds=[round(B * T / r[0]) for r in runs])
        del cases, model, state, step, their_step


@contextlib.contextmanager
def float32_lora_path(on: bool = True):
    """apply_lora with mlx-lm's own LoRALinear (float32 low-rank path) instead of ours, for comparisons."""
    from mlx_lm.tuner.lora import LoRALinear

    import lora_app.lora_layer as layer

    ours = layer.LoRALinear
    layer.LoRALinear = LoRALinear if on else ours
    try:
        yield
    finally:
        layer.LoRALinear = ours


def time_case(call, state, steps: int) -> tuple[float, float]:
    """Seconds per step of a compiled step enqueued back to back, and its peak memory in GB."""
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    out = [None]

    def fn(sync: bool, run: bool = True) -> None:
        if run:
            out[0] = call()
            mx.async_eval(out[0], state)
        if sync:
            mx.eval(out[0], state)

    return timed(fn, steps), mx.get_peak_memory() / 1e9


def make_data(a) -> tuple[Path, Path, Path]:
    """A model folder (random bf16 weights, a tiny BPE tokenizer) and uniform / mixed-length data."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from tiny import build_tokenizer
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "bench"))
    from compare_cli import build_data

    out = Path(a.work)
    model_dir = out / "model"
    if not (model_dir / "model.safetensors").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        config = SMALL if a.small else QWEN05
        build_tokenizer(model_dir, 512)
        model = build_mlx_model(a, config)
        mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
        (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"],
                                                            "torch_dtype": "bfloat16", "eos_token_id": 2}))
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        ns = argparse.Namespace(uniform_rows=a.batch * a.iters, uniform_len=a.seq, batch_size=a.batch,
                                mixed_rows=a.batch * a.iters, min_len=10, max_len=a.max_len)
        build_data(out, tok, ns)
    return model_dir, out / "uniform", out / "mixed"


def part_mlx_lm_train(a) -> None:
    """mlx-lm's train() (the loop the CLI runs) on the same tokenized rows our trainer uses."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from lora_app.config import DataConfig
    from lora_app.data import load_data

    model_dir, uniform, mixed = make_data(a)
    model, tok = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0,
                                                     "keys": ["self_attn.q_proj", "self_attn.v_proj"]})
    for name, folder in (("uniform", uniform), ("mixed", mixed)):
        rows = [(t, 0) for t, _ in load_data(DataConfig(data=str(folder)), tok, batch_size=a.batch).train]
        iters = len(rows) // a.batch  # one epoch

        class Cb(TrainingCallback):
            reports: list = []

            def on_train_loss_report(self, info):
                self.reports.append(info)

        cb = Cb()
        cb.reports = []
        mx.reset_peak_memory()
        tic = time.perf_counter()
        train(model, optim.AdamW(learning_rate=1e-5), rows, None,
              TrainingArgs(batch_size=a.batch, iters=iters, steps_per_report=10, steps_per_save=10**9,
                           max_seq_length=1024, adapter_file=str(Path(a.work) / f"mlxlm_{name}.safetensors")),
              training_callback=cb)
        wall = time.perf_counter() - tic
        total = cb.reports[-1]["trained_tokens"] - a.batch * iters  # minus mlx-lm's pad token per row
        later = cb.reports[1:] or cb.reports
        emit(part="mlx_lm_train", name=name, iters=iters, wall_s=wall, tokens=total,
             tok_s_all=total / wall, tok_s_reports=[round(r["tokens_per_second"]) for r in cb.reports],
             tok_s_after_first=sum(r["tokens_per_second"] for r in later) / len(later),
             peak_gb=mx.get_peak_memory() / 1e9)


def part_ours_loop(a) -> None:
    """Our engine through its CLI (the path the app uses), one epoch per dataset and batching mode."""
    from lora_app import runs

    model_dir, uniform, mixed = make_data(a)
    datasets = (("uniform", uniform, ["packed"]), ("mixed", mixed, ["packed", "padded"]))
    for name, folder, modes in [d for d in datasets if d[0] in a.loop_data.split(",")]:
        for mode in modes:
            run_dir = Path(a.work) / f"ours-{name}-{mode}"
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            iters = a.iters if mode == "padded" else max(1, epoch_steps(model_dir, folder, mode, a))
            tic = time.time()
            subprocess.run([sys.executable, "-m", "lora_app", "train", "--model", str(model_dir), "--data",
                            str(folder), "--batch-size", str(a.batch), "--iters", str(iters), "--rank", "8",
                            "--alpha", "16", "--learning-rate", "1e-5", "--max-seq-length", "1024",
                            "--batching", mode, "--steps-per-report", "10", "--steps-per-eval", "0",
                            "--save-every", str(iters), "--out", str(run_dir)]
                           + (["--modules", a.modules] if a.modules else []), check=True, cwd=ROOT,
                           env=runs.engine_env())
            process_wall = time.time() - tic
            ev = runs.read_events(run_dir)
            train = [e for e in ev if e["event"] == "train"]
            first = next(e for e in ev if e["event"] == "first_step")
            running = next(e for e in ev if e["event"] == "status" and e["status"] == "running")
            wall = train[-1]["time"] - running["time"]  # like mlx-lm's train(): model and data already loaded
            total = train[-1]["trained_tokens"]
            after = steady_tokens_per_second(ev)
            modules = f", modules {a.modules}" if a.modules else ""
            emit(part="ours_loop", name=f"{name} {mode}{modules}", iters=iters, wall_s=wall, tokens=total,
                 tok_s_all=total / wall, tok_s_after_first=after, first_step_s=first["time"] - tic,
                 running_to_first_step_s=first["time"] - running["time"],
                 process_wall_s=process_wall,
                 tok_s_reports=[round(e["tokens_per_second"]) for e in train],
                 peak_gb=max(e["peak_memory_gb"] for e in train))


def steady_tokens_per_second(events: list[dict]) -> float:
    """A CLI run's trained tokens after step 1 / the time from step 1 to its last report (its events.jsonl)."""
    train = [e for e in events if e["event"] == "train"]
    first = next(e for e in events if e["event"] == "first_step")
    return (train[-1]["trained_tokens"] - first.get("tokens", 0)) / max(train[-1]["time"] - first["time"], 1e-9)


def epoch_steps(model_dir: Path, folder: Path, mode: str, a) -> int:
    from transformers import AutoTokenizer

    from lora_app.batching import BatchPlan
    from lora_app.config import DataConfig
    from lora_app.data import load_data

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = load_data(DataConfig(data=str(folder)), tok, batch_size=a.batch).train
    return BatchPlan(rows, a.batch, 1024, mode).steps_per_epoch()


def part_torch(a) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    config = SMALL if a.small else QWEN05
    cfg = Qwen2Config(**{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(3, 500, (a.batch, a.seq + 1), device=dev)

    def step_of(m):
        def step(sync: bool, run: bool = True) -> None:
            if run:
                loss = m(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if sync and dev == "cuda":
                torch.cuda.synchronize()
        return step

    variants = [("eager", model)]
    if a.torch_compile:
        variants.append(("torch.compile", torch.compile(model)))
    for name, m in variants:
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        dt = timed(step_of(m), a.steps, warmup=3)
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None
        emit(part="torch", name=f"PyTorch {torch.__version__} + PEFT, {name}", ms=dt * 1000,
             tok_s=a.batch * a.seq / dt, peak_gb=peak, setup_s=time.perf_counter() - tic - dt * a.steps)


PARTS = {"prep": make_data, "ceiling": part_ceiling, "mlx_steps": part_mlx_steps, "mlx_lm_train": part_mlx_lm_train,
         "ours_loop": part_ours_loop, "torch": part_torch}


# ---- the parent: run the parts, print the table --------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=list(PARTS))
    ap.add_argument("--parts", default="ceiling,mlx_steps,mlx_lm_train,ours_loop,torch")
    ap.add_argument("--small", action="store_true", help="tiny shapes: check the code paths on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="mlx_steps: interleaved timing rounds per case")
    ap.add_argument("--iters", type=int, default=40, help="steps of the padded loops (one epoch)")
    ap.add_argument("--max-len", type=int, default=1000)
    ap.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--work", help="model, data and runs (default bench/out/gpu, with --small bench/out/gpu-small)")
    ap.add_argument("--loop-data", default="uniform,mixed", help="datasets of the ours_loop part")
    ap.add_argument("--modules", help="ours_loop: the CLI's --modules (default: the engine's, q/v)")
    ap.add_argument("--part-timeout", type=int, default=200)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--report-from", help="only print the tables, from the RESULT lines collected in this file "
                                          "(parts run one by one with --part, as bench/gpu_table.sh does)")
    a = ap.parse_args()
    a.work = a.work or str(ROOT / "bench" / "out" / ("gpu-small" if a.small else "gpu"))
    if a.small:
        a.batch, a.seq, a.steps, a.iters, a.max_len = 2, 64, 2, 4, 120
    if a.report_from:
        lines = Path(a.report_from).read_text().splitlines()
        print(report([json.loads(x[len("RESULT "):]) for x in lines if x.startswith("RESULT ")], a))
        return
    if a.part:
        random.seed(0)
        PARTS[a.part](a)
        return
    results = []
    t0 = time.perf_counter()
    for part in a.parts.split(","):
        passed = [x for x in sys.argv[1:] if not x.startswith("--parts")]  # use --parts=a,b
        cmd = [sys.executable, __file__, "--part", part, *passed]
        tic = time.perf_counter()
        out, rc, got = run_part(cmd, a.part_timeout)
        results += got
        print(f"[{part}] rc={rc} {time.perf_counter() - tic:.0f}s", flush=True)
        if rc != 0:
            print("\n".join(out.splitlines()[-25:]), flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(report(results, a))


def report(results: list[dict], a) -> str:
    config = SMALL if a.small else QWEN05
    fpt = flops_per_token(config, a.seq)
    ceiling = next((r["tflops"] for r in results if r["part"] == "ceiling"), None)
    device = next((r["device"] for r in results if r["part"] == "ceiling"), "?")

    def frac(tok_s: float) -> str:
        return f"{tok_s * fpt / 1e12 / ceiling * 100:.1f}%" if ceiling else "-"

    lines = [f"bf16 matmul ceiling (MLX, {8192 if not a.small else 1024}³): "
             f"{ceiling or float('nan'):.1f} TFLOP/s on {device}; {fpt / 1e9:.2f} GFLOP per token "
             f"(forward + activation gradients, seq {a.seq})", "",
             "MLX steps: the median of interleaved rounds (each round's tokens/s listed).", "",
             "| what | ms/step | tokens/s | each round | % of bf16 ceiling | peak memory (GB) |",
             "|---|---:|---:|---|---:|---:|"]
    for r in results:
        if r["part"] in ("mlx_step", "torch"):
            peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
            each = ", ".join(f"{x / 1000:.1f}k" for x in r.get("tok_s_rounds", [])) or "-"
            lines.append(f"| {r['name']} ({a.batch} × {a.seq}) | {r['ms']:.1f} | {r['tok_s']:,.0f} | {each} | "
                         f"{frac(r['tok_s'])} | {peak} |")
    lines += ["", "Training loops, one epoch each (tokens carrying loss; throughput after the first report window "
                  "for mlx-lm, after step 1 for ours):", "",
              "| loop | data | steps | trained tokens | tokens/s (steady) | tokens/s (whole run) | wall (s) | "
              "running → step 1 done (s) | peak (GB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["part"] in ("mlx_lm_train", "ours_loop"):
            who = "mlx-lm train()" if r["part"] == "mlx_lm_train" else "ours (CLI)"
            first = f"{r['running_to_first_step_s']:.2f}" if "running_to_first_step_s" in r else "-"
            lines.append(f"| {who} | {r['name']} | {r['iters']} | {r['tokens']:,} | {r['tok_s_after_first']:,.0f} | "
                         f"{r['tok_s_all']:,.0f} | {r['wall_s']:.1f} | {first} | {r['peak_gb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
