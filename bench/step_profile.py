"""Time the bare compiled LoRA step on one shape with different attention masks (CPU or GPU), in-process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python bench/step_profile.py --model bench/out/model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import mlx.core as mx
    import numpy as np

    from lora_app.batching import Batch
    from lora_app.config import LoraConfig, RunConfig
    from lora_app.head_loss import find_head
    from lora_app.lora import apply_lora
    from lora_app.models import load_model
    from lora_app.trainer import Trainer, batch_arrays, build_optimizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--segments", type=int, default=4, help="sequences per packed row")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    model, _ = load_model(args.model)
    apply_lora(model, LoraConfig(), seed=0)
    cfg = RunConfig()
    t = Trainer.__new__(Trainer)
    t.model, t.cfg, t.head = model, cfg, find_head(model)
    t.optimizer = build_optimizer(cfg, 100)
    t.optimizer.init(model.trainable_parameters())
    step, state = t.compiled_step()
    model.train()
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    tokens = rng.integers(3, 300, (B, T + 1)).astype(np.int32)
    weights = np.ones((B, T), np.float32)
    seg = np.repeat(np.arange(args.segments), T // args.segments)[None].repeat(B, 0).astype(np.int32)
    one = np.zeros((B, T), np.int32)
    cases = {"causal (no mask)": Batch(tokens, weights), "segment mask, 1 segment/row": Batch(tokens, weights, one),
             f"segment mask, {args.segments} segments/row": Batch(tokens, weights, seg)}
    for name, batch in cases.items():
        arrays = batch_arrays(batch)
        for _ in range(2):
            mx.eval(step(*arrays), state)
        tic = time.perf_counter()
        for _ in range(args.steps):
            out = step(*arrays)
            mx.async_eval(out, state)
        mx.eval(out, state)
        dt = (time.perf_counter() - tic) / args.steps
        print(f"{name:32s} {dt * 1000:8.1f} ms/step  {B * T / dt:10,.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
