"""The chunked LM-head loss against the plain logits loss on this machine's default device (issue 8).

    PYTHONPATH=/tmp/site python3 bench/head_loss_check.py      # on the GPU machine, after device-mlx-cuda.md's setup

tests/test_head_loss.py runs on the CPU, where the chunks are float32; on a GPU they stay bfloat16 and their loss
comes from MLX's fused cross-entropy kernel. This runs the engine's loss_fn both ways on a 2-block bf16 Qwen2 shape
with Qwen2's 151,936-word vocabulary (several chunks) and prints the losses and the largest gradient difference.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from gpu_bench import SMALL, build_mlx_model  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from lora_app.config import LoraConfig  # noqa: E402
from lora_app.head_loss import find_head, logits_dtype, tokens_per_chunk  # noqa: E402
from lora_app.lora import apply_lora  # noqa: E402
from lora_app.trainer import loss_fn  # noqa: E402


def main() -> None:
    model = build_mlx_model(SimpleNamespace(small=True), dict(SMALL, vocab_size=151936))
    apply_lora(model, LoraConfig(modules=["q_proj", "v_proj"]), seed=0)
    for name, b in tree_flatten(model.trainable_parameters()):  # non-zero B, so A gets a gradient too
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, mx.random.normal(b.shape, key=mx.random.key(3)) * 0.1)]))
    head = find_head(model)
    tokens = mx.random.randint(0, head.vocab, (4, 1025), key=mx.random.key(1))
    weights = (mx.random.uniform(shape=(4, 1024), key=mx.random.key(2)) > 0.3).astype(mx.float32)
    results = {}
    for name, h in (("plain", None), ("chunked", head)):
        (loss, _), grads = nn.value_and_grad(model, partial(loss_fn, head=h))(model, tokens, weights)
        mx.eval(loss, grads)
        results[name] = (loss.item(), dict(tree_flatten(grads)))
    (plain, pg), (chunked, cg) = results["plain"], results["chunked"]
    worst = max((mx.abs(cg[k] - pg[k]).max() / mx.maximum(mx.abs(pg[k]).max(), 1e-30)).item() for k in pg)
    print(f"device {mx.default_device()}, logits {logits_dtype(mx.bfloat16)}, "
          f"{tokens_per_chunk(head.vocab, logits_dtype(mx.bfloat16))} tokens a chunk of 4096")
    print(f"loss plain {plain:.6f} chunked {chunked:.6f} (rel {abs(chunked - plain) / plain:.2e}); "
          f"largest gradient difference {worst:.2%} of the largest entry")


if __name__ == "__main__":
    main()
