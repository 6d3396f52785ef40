"""mlx-lm's LoRALinear with the low-rank path computed in bfloat16 when the model runs in bfloat16.

mlx-lm keeps lora_a / lora_b in float32, so `(x @ lora_a) @ lora_b` promotes bf16 activations to float32: every
adapted module then writes a float32 copy of its input (kept for lora_a's gradient) and a float32 [tokens, out]
product, and runs its two thin matmuls without the GPU's bf16 units. Casting A and B to bf16 inside the call keeps
that path in bf16; the parameters, their gradients and the optimizer state stay float32 (the cast's gradient casts
back), as under PyTorch autocast. Float16 activations keep the float32 path: with no loss scaling, float16's narrow
range could flush the adapter's small gradients to zero. Float32 models are unaffected.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.tuner.lora import LoRALinear as MlxLmLoRALinear


class LoRALinear(MlxLmLoRALinear):
    def __call__(self, x: mx.array) -> mx.array:
        dtype = mx.bfloat16 if x.dtype == mx.bfloat16 else self.lora_a.dtype
        z = (self.dropout(x) @ self.lora_a.astype(dtype)) @ self.lora_b.astype(dtype)
        return self.linear(x) + (self.scale * z).astype(x.dtype)
