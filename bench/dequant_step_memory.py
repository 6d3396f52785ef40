"""One compiled QLoRA training step's memory with the quantized matmul and with the dequantized one
(lora_app/dequantized_matmul.py), on the CPU, under the limit the loop runs step 1 with (run_ahead.py), so the peak is
what the step's graph holds, not what the host allocated ahead.

    .venv/bin/python bench/dequant_step_memory.py          # about 5 minutes on 2 cores (the quantized side is slow)
    .venv/bin/python bench/dequant_step_memory.py --grad-checkpoint    # each block checkpointed, as the trainer does

A 4-bit llama of 4 blocks (hidden 1024, MLP 4096, float32 scales), LoRA rank 8 on all seven modules, 2 x 1024 tokens.
Each side runs in its own process; the dequantized side must peak no higher than the quantized one: every block's
weights dequantized at once would be 256 MiB more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def one_side(side: str, grad_checkpoint: bool) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    from memory_estimate import SMALL_LLAMA, build_model

    from lora_app import dequantized_matmul
    from lora_app.config import LoraConfig
    from lora_app.lora import apply_lora
    from lora_app.objective import CrossEntropy
    from lora_app.session import checkpoint_blocks
    from lora_app.trainer import training_step

    shape = dict(SMALL_LLAMA, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=2000)
    model = build_model(dict(model=shape, dtype="float32", bits=4))
    model.freeze()
    if side == "dequantized":
        dequantized_matmul.install(model)
    apply_lora(model, LoraConfig(rank=8, modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]), seed=0)
    if grad_checkpoint:
        checkpoint_blocks(model.layers[0])
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(model.trainable_parameters())
    step, state = training_step(model, opt, CrossEntropy(None))
    model.train()
    tokens = mx.random.randint(3, 2000, (2, 1025), key=mx.random.key(0))
    for _ in range(2):  # the second step is the one measured: compiled already
        mx.eval(state)
        before = mx.get_active_memory()
        limit = mx.set_memory_limit(before)
        mx.reset_peak_memory()
        loss, _, _ = step(tokens, mx.ones((2, 1024)))
        mx.eval(loss, state)
        mx.set_memory_limit(limit)
    label = side + (", checkpointed" if grad_checkpoint else "")
    print(f"{label}: step peak {(mx.get_peak_memory() - before) / 2**20:,.0f} MiB over the memory before it, "
          f"loss {loss.item():.4f}", flush=True)


def main() -> None:
    checkpointed = "--grad-checkpoint" in sys.argv
    sides = [a for a in sys.argv[1:] if a in ("quantized", "dequantized")]
    if sides:
        return one_side(sides[0], checkpointed)
    from lora_app import runs

    for side in ("quantized", "dequantized"):
        subprocess.run([sys.executable, __file__, side, *sys.argv[1:]], check=True, env=runs.engine_env())


if __name__ == "__main__":
    main()
