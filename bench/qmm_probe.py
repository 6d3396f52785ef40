"""Probe: MLX's quantized matmul against dequantize + bf16 matmul at an 8B model's training shapes (8192 tokens):
the product, and the gradient with respect to the input alone (mx.vjp's forward output is never evaluated).
Prints ms and TFLOP/s per call."""
import time

import mlx.core as mx

M = 8192
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}


def timeit(f, *args, n=20):
    for _ in range(3):
        mx.eval(f(*args))
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(f(*args))
    mx.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def cases(w, wq, s, b, g):
    def qmm(x):
        return mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)

    def deq(x):
        return x @ mx.dequantize(wq, s, b, group_size=64, bits=4).T

    return {"qmm": qmm, "deq+mm": deq, "bf16": lambda x: x @ w.T,
            "qmm input grad": lambda x: mx.vjp(qmm, [x], [g])[1][0],
            "deq input grad": lambda x: mx.vjp(deq, [x], [g])[1][0]}


for name, (out_f, in_f) in SHAPES.items():
    w = mx.random.normal((out_f, in_f)).astype(mx.bfloat16) * 0.02
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((M, in_f)).astype(mx.bfloat16)
    g = mx.random.normal((M, out_f)).astype(mx.bfloat16)
    tflop = 2 * M * in_f * out_f / 1e12
    parts = []
    for label, f in cases(w, wq, s, b, g).items():
        ms = timeit(f, x)
        parts.append(f"{label} {ms:.2f} ms ({tflop / (ms / 1e3):.0f} TF/s)")
    print(name, " | ".join(parts), flush=True)
