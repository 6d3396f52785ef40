"""Experiment (not in the engine): peak memory of the loss through the LM head, plain vs in chunks.

    .venv/bin/python bench/head_loss_memory.py [--compile]

The chunked loss computes each chunk's cross-entropy and d loss / d hidden together in the forward pass (an
mx.custom_function), so the whole [tokens, vocab] logits tensor never exists. "ordered" adds a data dependency so
chunk k+1 starts only after chunk k's gradient. A version without the ordering was in the engine at commit fc04520
and raised peak memory on the H200 (bench/RESULTS.md); this script measures the three on the local device with a
float32 head (vocab 32,000, hidden 256, 4,096 tokens, chunks of 524 tokens), each in its own process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

V, H, N, CHUNK = 32000, 256, 4096, 2**24 // 32000


def chunked_loss(head, targets, weights, ordered: bool):
    import mlx.core as mx

    @mx.custom_function
    def loss_and_grad(hidden, targets, weights):
        total, grads = mx.array(0.0), []
        for s in range(0, hidden.shape[0], CHUNK):
            h, t, w = hidden[s:s + CHUNK], targets[s:s + CHUNK], weights[s:s + CHUNK]
            if ordered and grads:
                h = h + (grads[-1][0, 0] * 0).astype(h.dtype)
            logits = head(h).astype(mx.float32)
            lse = mx.logsumexp(logits, axis=-1, keepdims=True)
            total = total + ((lse - mx.take_along_axis(logits, t[:, None], axis=-1))[:, 0] * w).sum()
            d_logits = (mx.exp(logits - lse) - (mx.arange(V) == t[:, None])) * w[:, None]
            grads.append(mx.vjp(head, [h], [d_logits.astype(h.dtype)])[1][0])
        return total, mx.concatenate(grads)

    @loss_and_grad.vjp
    def loss_and_grad_vjp(primals, cotangents, outputs):
        return (outputs[1] * cotangents[0]).astype(primals[0].dtype), *(mx.zeros_like(p) for p in primals[1:])

    return lambda hidden: loss_and_grad(hidden, targets, weights)[0]


def measure(kind: str, compiled: bool) -> None:
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(0)
    w_head = mx.random.normal((V, H)) * 0.02
    hidden = mx.random.normal((N, H))
    targets, weights = mx.random.randint(0, V, (N,)), mx.ones((N,))
    mx.eval(w_head, hidden, targets, weights)

    def head(h):
        return h @ w_head.T

    if kind == "plain":
        def fn(h):
            return (nn.losses.cross_entropy(head(h), targets) * weights).sum()
    else:
        fn = chunked_loss(head, targets, weights, ordered=kind == "ordered")
    step = mx.value_and_grad(fn)
    step = mx.compile(step) if compiled else step
    for _ in range(2):  # the second call is measured (the first compiles)
        mx.reset_peak_memory()
        tic = time.perf_counter()
        loss, grad = step(hidden)
        mx.eval(loss, grad)
        seconds = time.perf_counter() - tic
    print(f"| {kind} | {loss.item():.2f} | {mx.abs(grad).sum().item():.3f} | {mx.get_peak_memory() / 1e6:,.0f} | "
          f"{seconds * 1000:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--kind", choices=["plain", "chunked", "ordered"])
    a = ap.parse_args()
    if a.kind:
        measure(a.kind, a.compile)
        return
    print(f"| loss ({'compiled' if a.compile else 'eager'}) | sum | sum of abs(d hidden) | peak (MB) | ms |")
    print("|---|---:|---:|---:|---:|", flush=True)
    for kind in ("plain", "chunked", "ordered"):
        subprocess.run([sys.executable, __file__, "--kind", kind] + (["--compile"] if a.compile else []), check=True)


if __name__ == "__main__":
    main()
