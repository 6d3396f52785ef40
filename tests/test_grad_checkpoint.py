"""Gradient checkpointing (session.checkpoint_blocks) changes memory, never the numbers: the loss and every LoRA
gradient of a packed batch (several sequences per row, kept apart by a mask) equal the plain step's."""

from __future__ import annotations

import json
import subprocess
import sys

# In a process of its own: checkpointing patches the block class, which would reach other tests in this process.
SCRIPT = r"""
import json, sys
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from lora_app.batching import BatchPlan
from lora_app.config import LoraConfig
from lora_app.lora import apply_lora
from lora_app.models import load_model
from lora_app.objective import batch_arrays, loss_fn
from lora_app.session import checkpoint_blocks

model, _ = load_model(sys.argv[1], dequantize=False)
apply_lora(model, LoraConfig(modules=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]), seed=0)
mx.random.seed(0)  # B starts at zero, which zeroes A's gradient: give B values so that every path counts
model.update(tree_unflatten([(k, 0.05 * mx.random.normal(v.shape)) for k, v in
                             tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]))
rng = np.random.default_rng(0)
examples = [(rng.integers(3, 300, n).tolist(), [1] * n) for n in (9, 14, 5, 20, 7, 11, 6, 13)]
batch = BatchPlan(examples, 2, 64, "packed").batch_at(0)
assert batch.segments is not None, "rows of several sequences"

def grads():
    value_and_grad = nn.value_and_grad(model, lambda *a: loss_fn(model, *a)[0])
    loss, g = value_and_grad(*batch_arrays(batch))
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(g)}

plain = grads()
checkpoint_blocks(model.layers[0])
ckpt = grads()
print(json.dumps({"loss": [plain[0], ckpt[0]], "names": sorted(plain[1]),
                  "diff": max(float(abs(plain[1][k] - ckpt[1][k]).max()) for k in plain[1]),
                  "scale": max(float(abs(v).max()) for v in plain[1].values())}))
"""


def test_checkpointed_blocks_give_the_same_loss_and_gradients(tiny_model, engine_env):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model)], env=engine_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(out["loss"][0] - out["loss"][1]) < 1e-6
    assert any(name.endswith("lora_a") for name in out["names"]) and out["scale"] > 0
    assert out["diff"] <= 1e-5 * out["scale"]
