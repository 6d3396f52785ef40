"""The Test step's chat: time to the first token of a first and a follow-up message, and generation speed against
mlx-lm's generator on the same prompt and weights.

    .venv/bin/python bench/chat_latency.py [--model demo] [--rounds 3] [--tokens 200]

- before: what the Test step did until issue 26, one `python -m lora_app generate` process per answer (the model
  loaded again each time): time from the click to the first text on its stdout;
- worker: the chat's model worker (lora_app/ui/chat_worker.py: `python -m lora_app serve` kept loaded), a first
  message (the worker starts and loads the model) and a follow-up in the same conversation (prompt cache);
- speed: `--tokens` tokens (the end-of-text token suppressed, so both sides generate all of them) of a greedy
  answer through the worker's streamed HTTP API, against mlx-lm's `stream_generate` (what `mlx_lm.generate`
  runs) in this process on the same prompt and the same weights (our loader: on a CPU the 4-bit demo model is
  de-quantized to float32, as the worker does); rate = (tokens - 1) / (last token - first token) on both sides.
Both sides get an adapter like the demo's (rank 8, alpha 16, q/v of every block; random B, so it is not a no-op).
Each round runs every part once, alternating, so the machine's drift spreads over both; the table has medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lora_app import runs  # noqa: E402

FIRST = "Write a short story about a robot who learns to paint."
FOLLOW_UP = "Now give the story a title."


def before_ttft(model: str, adapter: str | None, prompt: str) -> float:
    """The old Test step: a fresh `generate` process per answer; seconds until its first text."""
    from lora_app.ui.engine import stream_generate

    start = time.perf_counter()
    for text in stream_generate(model, adapter, prompt, 8):
        if text.strip():
            return time.perf_counter() - start
    raise RuntimeError("no text")


def worker_round(model: str, adapter: str, tokens: int, eos: list[int]) -> dict:
    """A fresh worker: the first message, a follow-up, then a long greedy answer per model id."""
    from lora_app.ui.chat_worker import WorkerKey, Workers

    workers = Workers(idle_s=3600)
    key = WorkerKey(model, adapter)
    short = {"temperature": 0.0, "max_tokens": 48, "seed": 0}
    out = {}
    try:
        start = time.perf_counter()
        for reply in workers.chat(key, "adapter", [{"role": "user", "content": FIRST}], short):
            out.setdefault("first", time.perf_counter() - start)  # the worker's start and model load included
            answer = reply.text
        turns = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": answer},
                 {"role": "user", "content": FOLLOW_UP}]
        *_, second = workers.chat(key, "adapter", turns, short)
        out["second"] = second.first_token_s
        out["prompt"] = second.usage.get("prompt_tokens")
        out["cached"] = (second.usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        long = {"temperature": 0.0, "max_tokens": tokens, "seed": 0, "logit_bias": {str(t): -1000.0 for t in eos}}
        for model_id in ("base", "adapter"):
            stamps, seen = [], 0
            for reply in workers.chat(key, model_id, [{"role": "user", "content": FIRST}], long):
                if reply.chunks > seen:  # a piece of text arrived
                    stamps.append(time.perf_counter())
                    seen = reply.chunks
            n = reply.tokens
            out[f"tps_{model_id}"] = (n - 1) / (stamps[-1] - stamps[0])
            out[f"n_{model_id}"] = n
    finally:
        workers.release("bench")
    return out


def mlx_lm_rates(models: dict, tokens: int, eos: list[int]) -> dict:
    """mlx-lm's stream_generate on the same prompt and weights: tokens/s after the first token."""
    import mlx.core as mx
    from mlx_lm import stream_generate

    def no_eos(_tokens, logits):
        return logits.at[:, eos].add(-1000.0)

    out = {}
    for name, (model, tokenizer) in models.items():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": FIRST}], add_generation_prompt=True)
        stamps = [time.perf_counter() for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens,
                                                                logits_processors=[no_eos])]
        out[f"tps_{name}"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        out[f"n_{name}"] = len(stamps)
        mx.clear_cache()
    return out


def make_adapter(model: str, folder: Path) -> Path:
    from tiny import build_tiny_adapter

    return build_tiny_adapter(folder, Path(model), rank=8, alpha=16.0, b_scale=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    env = runs.engine_env()
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):  # this process generates too: the same BLAS
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from lora_app.models import resolve_model
    from lora_app.serve import load_served, plan

    model = resolve_model(args.model)
    folder = make_adapter(model, Path(tempfile.mkdtemp(prefix="chat-bench-")) / "adapters")
    models = load_served(plan(model, [f"adapter={folder}"]))
    tokenizer = models["base"][1]
    eos = sorted(tokenizer.eos_token_ids)
    rows: dict[str, list[float]] = {}
    notes = []
    for k in range(args.rounds):
        parts = {"before": before_ttft(args.model, str(folder), FIRST), **worker_round(args.model, str(folder),
                 args.tokens, eos)}
        parts.update({f"ref_{k2}": v for k2, v in mlx_lm_rates(models, args.tokens, eos).items()})
        for name, value in parts.items():
            if isinstance(value, (int, float)):
                rows.setdefault(name, []).append(value)
        notes.append(parts)
        print(f"round {k + 1}: " + ", ".join(f"{n} {v:.3f}" if isinstance(v, float) else f"{n} {v}"
                                             for n, v in parts.items()), file=sys.stderr, flush=True)
    med = {name: statistics.median(values) for name, values in rows.items()}

    def each(name: str, fmt: str = ".2f") -> str:
        return ", ".join(format(v, fmt) for v in rows[name])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"\n{time.strftime('%Y-%m-%d')}, commit {commit}, {platform.machine()} {platform.system()}, "
          f"{os.cpu_count()} cores, model {args.model}, {args.rounds} rounds (median; each round in brackets)\n")
    print("| measure | value | each round |\n|---|---:|---|")
    print(f"| before: time to first token, every message (a `generate` process each) | {med['before']:.2f} s | "
          f"{each('before')} |")
    print(f"| worker: time to first token, first message (starts the worker, loads the model) | "
          f"{med['first']:.2f} s | {each('first')} |")
    print(f"| worker: time to first token, follow-up message ({rows['prompt'][0]:.0f}-token prompt, "
          f"{rows['cached'][0]:.0f} from the prompt cache) | "
          f"{med['second']:.3f} s | {each('second', '.3f')} |")
    print(f"| follow-up vs first message | **{med['first'] / med['second']:.0f}×** faster | |")
    for name in ("base", "adapter"):
        ratio = med[f"tps_{name}"] / med[f"ref_tps_{name}"]
        print(f"| {name}: generation tokens/s, worker (HTTP stream) / mlx-lm stream_generate, {args.tokens} tokens "
              f"| {med[f'tps_{name}']:.1f} / {med[f'ref_tps_{name}']:.1f} (**{ratio:.2f}**) | "
              f"{each(f'tps_{name}', '.1f')} / {each(f'ref_tps_{name}', '.1f')} |")


if __name__ == "__main__":
    main()
