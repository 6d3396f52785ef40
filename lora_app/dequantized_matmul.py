"""QLoRA's frozen 4- and 8-bit weights multiplied as bfloat16 on CUDA: dequantize the weight, then one GEMM.

A training step multiplies thousands of tokens by each frozen weight, forward and for the input's gradient. At those
shapes MLX's CUDA quantized matmul reaches a fifth of what a bfloat16 GEMM does: on the lent H200 (MLX 0.32.4,
`python3 bench/qmm_probe.py`, 8,192 tokens, Llama-3.1-8B's gate_proj) the product took 8.01 ms and the input's
gradient 7.55 ms, against 1.52 and 1.57 ms dequantized and multiplied in bfloat16. Decoding a token at a time is the
opposite case (the weight's bytes are the cost), so inputs of fewer than MIN_TOKENS tokens keep the quantized
matmul, and only training installs this (session.prepare).

The dequantized weight is a temporary: `mx.custom_function` makes the backward pass dequantize again instead of
autodiff keeping every block's bfloat16 weights (16 GB for an 8B model) until the gradient reaches them. Only the
blocks' linear modules are switched: the LM head's weight dequantized would be a gigabyte of bfloat16 per chunk of
the loss (head_loss.py).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn

MIN_TOKENS = 1024


class DequantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose product with many tokens is a bfloat16 GEMM on the dequantized weight."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < MIN_TOKENS or self.mode != "affine":
            return super().__call__(x)
        y = matmul_for(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
        return y + self["bias"] if "bias" in self else y


@cache
def matmul_for(group_size: int, bits: int) -> Any:
    """x @ dequantize(weight).T whose backward pass dequantizes again (no weight kept for it)."""

    def dequantized(weight: mx.array, scales: mx.array, biases: mx.array, dtype: Any) -> mx.array:
        return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits).astype(dtype)

    # Each dequantize depends on the array it multiplies (mx.depends). Depending on frozen weights alone, MLX may
    # evaluate every block's dequantize first and hold them all, and mx.compile merges the backward's with the
    # forward's, identical then, holding each from the forward pass to the backward one.
    @mx.custom_function
    def matmul(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        return x @ dequantized(mx.depends(weight, x), scales, biases, x.dtype).T

    @matmul.vjp
    def matmul_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
        x, weight, scales, biases = primals
        # The weights are frozen: their zero cotangents are never evaluated
        return (cotangent @ dequantized(mx.depends(weight, cotangent), scales, biases, cotangent.dtype),
                mx.zeros_like(weight), mx.zeros_like(scales), mx.zeros_like(biases))

    return matmul


def wanted() -> bool:
    """On MLX's CUDA backend (measured there); Metal's and the CPU's quantized matmuls are not measured against it."""
    return mx.default_device().type == mx.gpu and not mx.metal.is_available()


def install(model: Any) -> int:
    """Switch the quantized linear modules of the model's blocks to DequantizedLinear; returns how many."""
    switched = 0
    for block in model.layers:
        for _, module in block.named_modules():
            if type(module) is nn.QuantizedLinear:
                module.__class__ = DequantizedLinear
                switched += 1
    return switched
