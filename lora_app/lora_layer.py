"""mlx-lm's LoRALinear with the low-rank path computed in bfloat16 when the model runs in bfloat16.

mlx-lm keeps lora_a / lora_b in float32, so `(x @ lora_a) @ lora_b` promotes bf16 activations to float32: every
adapted module then writes a float32 copy of its input (kept for lora_a's gradient) and a float32 [tokens, out]
product, and runs its two thin matmuls without the GPU's bf16 units. Casting A and B to bf16 inside the call keeps
that path in bf16; the parameters, their gradients and the optimizer state stay float32 (the cast's gradient casts
back), as under PyTorch autocast. Float16 activations keep the float32 path: with no loss scaling, float16's narrow
range could flush the adapter's small gradients to zero. Float32 models are unaffected.

In the bf16 path the scale is folded into B (a [rank, out] multiply instead of one on the [tokens, out] product,
forward and backward) and the product is added by the matmul itself (`mx.addmm`, the GEMM's epilogue) rather than
by a separate kernel over [tokens, out]. On an H200 (0.5B Qwen2, 8 x 512; git log -- bench/lora_kernels.py) this took
the all-linear step from 3,540 to 3,252 kernels and 51.5 to 49.9 ms of GPU time, and the q/v step from 1,788 to
1,692 kernels at the same GPU time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
from mlx_lm.tuner.dora import DoRALinear as MlxLmDoRALinear
from mlx_lm.tuner.lora import LoRALinear as MlxLmLoRALinear

_OFF = [False]  # inside adapters_off(): every adapted layer computes its frozen base alone


@contextmanager
def adapters_off() -> Iterator[None]:
    """The base model without a second copy of it: LoRA and DoRA layers skip their adapter inside this context
    (DPO's reference). A Python flag read while a function is traced: a compiled step holds both passes."""
    _OFF[0] = True
    try:
        yield
    finally:
        _OFF[0] = False


class LoRALinear(MlxLmLoRALinear):
    def __call__(self, x: mx.array) -> mx.array:
        if _OFF[0]:
            return self.linear(x)
        if x.dtype != mx.bfloat16:
            return super().__call__(x)
        y = self.linear(x)
        # As 2-D [tokens, features] products: with a batch axis addmm is a batched GEMM whose gradient for the
        # broadcast B is reduced over the batch by a separate kernel.
        h = self.dropout(x).reshape(-1, x.shape[-1]) @ self.lora_a.astype(x.dtype)
        b = (self.scale * self.lora_b).astype(x.dtype)
        return mx.addmm(y.reshape(-1, y.shape[-1]), h, b).reshape(y.shape)


class DoRALinear(MlxLmDoRALinear):
    """mlx-lm's DoRALinear, switched off by adapters_off() like LoRALinear."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x) if _OFF[0] else super().__call__(x)
