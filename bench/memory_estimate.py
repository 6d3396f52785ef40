"""The memory estimate (lora_app/memory.py) against the measured MLX peak of real training steps.

    .venv/bin/python bench/memory_estimate.py           # CPU: the demo default; a small llama, uniform/mixed, ± ckpt
    .venv/bin/python bench/memory_estimate.py --small   # every code path at toy sizes (CPU, about a minute)
    python3 bench/memory_estimate.py --gpu --out DIR    # GPU: a Qwen2-0.5B shape in bf16, a Llama-3.1-8B shape in
                                                        #   4 bits; uniform/mixed rows, ± ckpt (--only 8B: those)
    python3 bench/memory_estimate.py --sweep [--gpu]    # bare steps at other shapes: what memory.FIT was fitted to
    .venv/bin/python bench/memory_estimate.py --render rows-cpu.jsonl   # a recorded table with today's estimate

Each table row trains through the trainer itself (trainer.run on a run folder: session.prepare, its memory check,
the compiled step, the run-ahead bound) in a process of its own, 2 steps, and reads the peak from the train events
(`peak_memory_gb`: mx.get_peak_memory() since the reset before step 1, so the frozen weights count and the loading
does not). The estimate is the one the trainer logs before step 1 (session.check_memory), for the widest batch
the data gives. Random-weight models are built from config dicts with mlx-lm's own classes (and mlx-lm's
quantize_model) and handed to the trainer in place of a loaded folder; their data are token ids of chosen lengths.
Nothing here imports gradio or datasets, so it runs on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN05 = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
              rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768)
LLAMA8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
               rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072,
               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"})
SMALL_LLAMA = dict(model_type="llama", hidden_size=512, num_hidden_layers=8, intermediate_size=1536,
                   num_attention_heads=8, num_key_value_heads=4, vocab_size=32000, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=True)
TOY = dict(SMALL_LLAMA, hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=1000)


def cpu_rows(small: bool) -> list[dict]:
    """The demo as a new user runs it, then a small llama (float32, LoRA q/v rank 8) on uniform and mixed rows."""
    model = TOY if small else SMALL_LLAMA
    uniform, mixed, max_len = ((60, 60), (10, 120), 128) if small else ((512, 512), (10, 1000), 1024)
    rows = [dict(name="demo default (demo model, demo data, batch 4, max 2048, packed)", demo=True)]
    for data, lengths in (("uniform", uniform), ("mixed", mixed)):
        for ckpt in (False, True):
            rows.append(dict(name=f"small llama 41M f32, {data} {lengths[0]}-{lengths[1]}", model=model,
                             lengths=lengths, max_seq_length=max_len, grad_checkpoint=ckpt, batch_size=4,
                             rank=8, modules=["q_proj", "v_proj"], dtype="float32"))
    if small:
        rows[0] = dict(rows[1], name="toy (stands in for the demo in --small)")
    return rows


def gpu_rows(small: bool) -> list[dict]:
    """LoRA r16 on all 7 linear modules of every block, batch 4, chat-like lengths up to 2048."""
    rows = []
    models = [("Qwen2-0.5B shape, bf16", QWEN05, None), ("Llama-3.1-8B shape, 4-bit", LLAMA8B, 4)]
    if small:
        models = [("toy bf16", TOY, None), ("toy 4-bit", TOY, 4)]
    for label, config, bits in models:
        for data, lengths in (("uniform", (1000, 1000)), ("mixed", (50, 2000))):
            lengths = (lengths[0] // 8, lengths[1] // 8) if small else lengths
            for ckpt in (False, True):
                rows.append(dict(name=f"{label}, {data} {lengths[0]}-{lengths[1]}", model=config, bits=bits,
                                 lengths=lengths,
                                 max_seq_length=256 if small else 2048, grad_checkpoint=ckpt, batch_size=4,
                                 rank=16, modules=ALL7, dtype="bfloat16"))
    return rows


# ---- one row, in a process of its own ------------------------------------------------------------------------

def build_model(row: dict):
    """A model of the row's config with random weights, in its dtype, quantized with mlx-lm's quantize_model."""
    import importlib

    import mlx.core as mx

    mx.random.seed(0)
    arch = importlib.import_module(f"mlx_lm.models.{row['model']['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(row["model"]))  # lazy: nothing is made yet
    dtype = getattr(mx, row["dtype"])
    for part in [*model.layers, model]:  # block by block: an 8B model in float32 would be 32 GB at once
        part.set_dtype(dtype)
        mx.eval(part.parameters())
    if row.get("bits"):
        from mlx_lm.utils import quantize_model

        model, _ = quantize_model(model, dict(row["model"]), group_size=64, bits=row["bits"])
        mx.eval(model.parameters())
    return model


def synthetic_examples(lengths: tuple[int, int], vocab: int, n: int, seed: int = 0) -> list:
    """n rows of token ids with lengths spread evenly over [lo, hi] (the longest one among them), every token a
    target but the first."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lo, hi = lengths
    sizes = rng.integers(lo, hi + 1, n)
    sizes[0] = hi
    return [(rng.integers(3, vocab, int(k)).tolist(), [0] + [1] * (int(k) - 1)) for k in sizes]


def run_row(row: dict, out: Path) -> dict:
    """Train the row through trainer.run and read its events: the trainer's estimate and the measured peaks."""
    import mlx.core as mx

    from lora_app import data, memory, models, runs, trainer
    from lora_app.config import RunConfig

    flat = {"iters": 2, "steps_per_report": 1, "steps_per_eval": 0, "save_every": 1000, "probe_prompts": []}
    if row.get("demo"):
        flat |= {"model": "demo", "data": "demo"}  # every other setting at its default, as a new user has them
    else:
        model = build_model(row)
        examples = synthetic_examples(tuple(row["lengths"]), row["model"]["vocab_size"], 64)
        models.resolve_model = lambda name: name
        models.load_model = lambda *a, **k: (model, None)
        data.load_data = lambda *a, **k: data.LoadedData(train=examples, format="text")
        flat |= {"model": "random", "data": "synthetic", "batch_size": row["batch_size"],
                 "max_seq_length": row["max_seq_length"], "grad_checkpoint": row["grad_checkpoint"],
                 "rank": row["rank"], "modules": row["modules"], "batching": row.get("batching", "packed")}
    seen = {}
    check = memory.check_model

    def check_model(*args, **kw):  # the trainer's own check; the arguments are kept to recompute the estimate
        seen["args"] = args
        return check(*args, **kw)

    memory.check_model = check_model
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    outcome = trainer.run(run_dir, RunConfig.from_flat(flat))
    events = runs.read_events(run_dir)
    estimate = next((e["memory_estimate"] for e in events if "memory_estimate" in e), {})
    peaks = [e["peak_memory_gb"] for e in events if e["event"] == "train"]
    result = dict(name=row["name"], status=outcome.status, message=outcome.message[:300], estimate=estimate,
                  peak_step1=peaks[0] * 1e9 if peaks else None, peak=max(peaks) * 1e9 if peaks else None,
                  peak_process=mx.get_peak_memory(), seconds=time.perf_counter() - start,
                  device=str(mx.default_device()), row={k: v for k, v in row.items() if k != "model"})
    if "args" in seen:
        result |= estimate_inputs(*seen["args"][:5])
    return result


def estimate_inputs(model, trainable: int, batch: int, width: int, ckpt: bool) -> dict:
    """What memory.estimate_training_memory was given for this run, so --render can recompute it."""
    from lora_app.memory import model_estimate_inputs

    info, kw = model_estimate_inputs(model)
    return dict(info=info, estimate_args=dict(trainable_params=trainable, batch_size=batch, max_seq_length=width,
                                              grad_checkpoint=ckpt, **kw))


# ---- the sweep: bare compiled steps (the trainer's) at other shapes ----------------------------------------------

def sweep_configs(gpu: bool, small: bool) -> list[dict]:
    """Shapes the coefficients are fitted to: blocks, width and batch, hidden and MLP sizes, targets, ckpt."""
    if gpu:
        base = dict(model=dict(QWEN05, num_hidden_layers=8), dtype="bfloat16", batch_size=4, width=1024, rank=16,
                    modules=ALL7)
        variants = [{}, {"width": 2048}, {"batch_size": 8}, {"layers": "last:4"}, {"modules": ["q_proj", "v_proj"]},
                    {"model": dict(LLAMA8B, num_hidden_layers=4), "bits": 4},
                    {"model": dict(LLAMA8B, num_hidden_layers=4), "bits": 4, "width": 2048},
                    {"model": dict(LLAMA8B, num_hidden_layers=4), "bits": 4, "modules": ["q_proj", "v_proj"]},
                    {"grad_checkpoint": True}, {"grad_checkpoint": True, "width": 2048},
                    {"grad_checkpoint": True, "model": dict(LLAMA8B, num_hidden_layers=4), "bits": 4}]
    else:
        base = dict(model=dict(SMALL_LLAMA, num_hidden_layers=4), dtype="float32", batch_size=2, width=256, rank=8,
                    modules=["q_proj", "v_proj"])
        small_vocab = dict(base["model"], vocab_size=1000)
        variants = [{}, {"width": 512}, {"batch_size": 4}, {"layers": "last:2"}, {"modules": ALL7},
                    {"grad_checkpoint": True}, {"grad_checkpoint": True, "modules": ALL7}, {"dtype": "bfloat16"},
                    {"grad_checkpoint": True, "batch_size": 4, "width": 1024},
                    {"grad_checkpoint": True, "batch_size": 4, "width": 1024, "model": small_vocab},
                    {"batch_size": 4, "width": 1024, "model": small_vocab}]
    if small:
        base = dict(base, model=TOY, width=64)
        variants = variants[:2] + [v for v in variants if v.get("grad_checkpoint")][:1]
        for v in variants:
            v.pop("model", None), v.pop("bits", None)
            if "width" in v:
                v["width"] = 128
    return [dict(base, **v) for v in variants]


def sweep_one(cfg: dict) -> dict:
    """One compiled training step as trainer.train builds and runs it, on random rows of the config's width; the
    step's peak (weights included, as in the table) and the estimate for the same shape."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from lora_app import run_ahead
    from lora_app.config import LoraConfig
    from lora_app.head_loss import find_head
    from lora_app.lora import apply_lora, trainable_parameter_count
    from lora_app.memory import estimate_training_memory
    from lora_app.objective import CrossEntropy
    from lora_app.trainer import training_step

    model = build_model(cfg)
    apply_lora(model, LoraConfig(rank=cfg["rank"], modules=cfg["modules"], layers=cfg.get("layers", "all")), seed=0)
    if cfg.get("grad_checkpoint"):
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    opt = optim.AdamW(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    step, state = training_step(model, opt, CrossEntropy(find_head(model)))
    model.train()
    b, w = cfg["batch_size"], cfg["width"]
    tokens = mx.random.randint(3, cfg["model"]["vocab_size"], (b, w + 1)).astype(mx.int32)
    mx.eval(state, tokens)
    inputs = estimate_inputs(model, trainable_parameter_count(model), b, w, bool(cfg.get("grad_checkpoint")))
    estimate = estimate_training_memory(inputs["info"], **inputs["estimate_args"])
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    # As trainer.train runs step 1: on a GPU under a memory limit at the memory in use, so the host does not
    # allocate ahead of the GPU and the peak is what the step needs (run_ahead.py).
    usual = run_ahead.tighten_for_step_1(0)
    mx.eval(step(tokens, mx.ones((b, w))), state)
    peaks = [mx.get_peak_memory()]
    if usual is not None:
        mx.set_memory_limit(usual)
    return dict(cfg={k: v for k, v in cfg.items() if k != "model"}, model={k: cfg["model"][k] for k in (
        "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "vocab_size")}, before=before, peak=max(peaks), estimate=estimate,
        device=str(mx.default_device()), **inputs)


# ---- the parent: one process per row, then the table ---------------------------------------------------------

def in_process(kind: str, payload: dict, out: Path, timeout: int) -> dict:
    """Run one row (or sweep config) in a fresh process: MLX's peak, its caches and mlx-lm's grad_checkpoint
    (which patches the block's class) start clean."""
    from lora_app.run_ahead import set_graph_size
    from lora_app.runs import engine_env

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, f"--{kind}", json.dumps(payload), "--out", str(out)]
    env = engine_env()  # OpenBLAS on a Linux CPU and (set_graph_size) MLX's CUDA graphs as the training CLI has them
    set_graph_size(env)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    results = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
    if not results:
        return dict(name=payload.get("name", ""), status="failed", message=text[-1500:], row=payload)
    return results[-1]


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}" if n >= 1e8 else f"{n / 1e9:.3f}"


def table(results: list[dict]) -> str:
    lines = ["| config | ckpt | width | estimate: weights + LoRA | activations | total (GB) | measured peak, step 1 "
             "(GB) | estimate / measured | peak of 2 steps (GB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        e, peak = r.get("estimate") or {}, r.get("peak_step1")
        ratio = f"{e['total'] / peak:.2f}" if e and peak else f"- ({r.get('status')}: {r.get('message', '')[:80]})"
        ckpt = "yes" if r.get("row", {}).get("grad_checkpoint") else "no"
        weights = gb(e.get("weights", 0) + e.get("lora_optimizer", 0)) if e else "-"
        lines.append(f"| {r['name']} | {ckpt} | {e.get('width', '-')} | {weights} | {gb(e.get('activations'))} | "
                     f"{gb(e.get('total'))} | {gb(peak)} | {ratio} | {gb(r.get('peak'))} |")
    return "\n".join(lines)


def sweep_table(results: list[dict]) -> str:
    lines = ["| model | layers | dtype/bits | batch × width | modules | ckpt | estimate (GB) | measured (GB) | ratio |",
             "|---|---:|---|---|---|---|---:|---:|---:|"]
    for r in results:
        if "cfg" not in r:
            lines.append(f"| failed: {r.get('message', '')[-200:]!r} |")
            continue
        c, m, e = r["cfg"], r["model"], r["estimate"]
        lines.append(f"| {m['model_type']} h{m['hidden_size']} | {m['num_hidden_layers']} ({c.get('layers', 'all')})"
                     f" | {c.get('bits') or c['dtype']} | {c['batch_size']} × {c['width']} | {len(c['modules'])} | "
                     f"{'yes' if c.get('grad_checkpoint') else 'no'} | {gb(e['total'])} | {gb(r['peak'])} | "
                     f"{e['total'] / r['peak']:.2f} |")
    return "\n".join(lines)


def rerender(path: Path) -> str:
    """The table from recorded results, with the estimate recomputed by today's memory.py for the same runs."""
    from lora_app.memory import estimate_training_memory

    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in results:
        if r.get("info"):
            r["estimate"] = estimate_training_memory(r["info"], **r["estimate_args"])
    return (sweep_table if "cfg" in results[0] else table)(results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the GPU rows (Qwen2-0.5B bf16, Llama-8B 4-bit shapes)")
    ap.add_argument("--small", action="store_true", help="toy sizes: a quick check of every code path")
    ap.add_argument("--sweep", nargs="?", const="all", help="the calibration sweep (bare steps)")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--render", help="print the table of a recorded .jsonl with today's estimate")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "memory"))
    ap.add_argument("--only", default="", help="run the rows whose name contains this")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per row")
    ap.add_argument("--batching", choices=("packed", "padded"), default="packed",
                    help="padded: one sequence a row, no attention mask (the rows' names say so)")
    a = ap.parse_args()
    out = Path(a.out)
    if a.render:
        print(rerender(Path(a.render)))
        return 0
    if a.row:  # a child: one row
        print("RESULT " + json.dumps(run_row(json.loads(a.row), out)), flush=True)
        return 0
    if a.sweep and a.sweep != "all":  # a child: one sweep config
        print("RESULT " + json.dumps(sweep_one(json.loads(a.sweep))), flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"{'sweep' if a.sweep else 'rows'}-{'gpu' if a.gpu else 'cpu'}{'-small' if a.small else ''}.jsonl"
    record.write_text("")
    results = []
    if a.sweep:
        for cfg in sweep_configs(a.gpu, a.small):
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                results.append(in_process("sweep", cfg, Path(tmp), a.timeout))
            with record.open("a") as f:
                f.write(json.dumps(results[-1]) + "\n")
            print(sweep_table(results[-1:]).splitlines()[-1], flush=True)
        print(sweep_table(results))
        return 0
    for row in gpu_rows(a.small) if a.gpu else cpu_rows(a.small):
        if a.only not in row["name"]:
            continue
        if a.batching == "padded":
            row = dict(row, batching="padded", name=row["name"] + ", padded")
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            results.append(in_process("row", row, Path(tmp), a.timeout))
        with record.open("a") as f:
            f.write(json.dumps(results[-1]) + "\n")
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print(f"\n{results[0].get('device', '')}, {time.strftime('%Y-%m-%d')}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
