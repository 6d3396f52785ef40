"""How far the host may run ahead of the GPU: the training loop's memory policy (bench/README.md has the figures).

MLX allocates a kernel's buffers when the host encodes it and frees them only once the GPU has run it. The host
encodes a whole step in a few ms while the GPU needs tens of ms for it, so unbounded, the buffers of most of a step
(and with async_eval, of the next one) are held at once: on an H100 (0.5B model, 8 x 512, MLX's CUDA graphs of 1000
MB) 14.8 GB against the 8.7 GB a step needs. MLX's scheduler waits for running work before encoding more once active
memory passes the memory limit, so the loop runs step 1 under a limit at the memory in use (its peak is then what a
step needs), and after it sets a limit at that peak plus a headroom. Too little headroom costs speed: the host then
waits for the GPU before most allocations and the GPU for the host after. The headroom takes at most half of what
the machine gives the GPU beyond a step's need (memory.available_memory: a Mac's recommended working set, two thirds
of a 16 GB Mac's memory), where MLX's own default limit (1.5 times that on a Mac) would allow more. A user-set
memory_limit_gb is left as it is (that is how a user trades memory for speed); on the CPU, system memory is the
limit already.

How much the host holds ahead also follows how MLX batches kernels. Metal commits a command buffer every 40-50 ops
or MB of inputs; MLX's CUDA backend gathers kernels into a CUDA graph until its inputs pass 1000 MB (on an H100),
launches it only then, and frees its buffers only when all of it has run. For training, set_graph_size() caps a
graph at GRAPH_MB before MLX starts. On an H100 (bench/README.md, the 8B QLoRA) the checkpointed batch-1 run the app
proposes for a 16 GB Mac then needed 8.68 GB a step instead of 9.57, peaked at 10.18 GB instead of 11.12 and took
41.5 s instead of 57.2: as MLX's source reads, under the memory limit the host waited for a whole graph to run
before it went on, and the GPU idled while the host gathered the next. With graphs of 50 MB the run-ahead bound cost
nothing there (41.4 s without it, 41.8 s with it). The unconstrained batch-4 run needed 0.7 GB less at the same wall
time, and 3.5% fewer tokens a second after step 1. Generation keeps MLX's graphs: a decoding step is many small
kernels, which such a cap would launch a few at a time (not measured).
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping

# MLX_MAX_MB_PER_BUFFER for training processes: the MB of kernel inputs one CUDA graph gathers (see above). 50, 100
# and 200 ran the 8B QLoRA about equally fast, 50 at 0.3 GB less; 100 launches half as many graphs as 50 where
# kernels are small (a small model's, not measured).
GRAPH_MB = 100

# The memory over step 1's peak the host may allocate ahead of the GPU. Speed followed this absolute headroom on an
# H200 (a 0.5B model, graphs of 1000 MB): less cost up to 15%, more ran no faster, each GB adding a GB of peak. A
# bigger model's kernels run longer, so the same bytes keep the GPU fed as long; a share of the peak instead took 5.9
# GB on an 8B QLoRA.
RUN_AHEAD_HEADROOM = 2e9


def set_graph_size(environ: MutableMapping[str, str] = os.environ) -> None:
    """Cap MLX's CUDA graphs at GRAPH_MB for a training process, unless the user chose a size: call it before the
    process first uses MLX's GPU (MLX reads the variable once). Metal keeps its own (40-50)."""
    if platform.system() != "Darwin":
        environ.setdefault("MLX_MAX_MB_PER_BUFFER", str(GRAPH_MB))


def tighten_for_step_1(memory_limit_gb: float) -> int | None:
    """On a GPU without a user-set limit, set MLX's memory limit to the memory in use now and return the limit it
    replaces; else None. Under it MLX waits for running work before each new allocation, so step 1's peak is what a
    step needs, not what the host allocated ahead of the GPU."""
    import mlx.core as mx

    if memory_limit_gb or mx.default_device().type == mx.cpu:
        return None
    return mx.set_memory_limit(mx.get_active_memory())


def bound_run_ahead(before: int, step_1_tokens: int, biggest_tokens: int, usual_limit: int | None) -> None:
    """Right after step 1 (with tighten_for_step_1's result): cap the memory at step 1's peak plus the headroom.
    `before`: the memory in use before step 1. The part above it is scaled from step 1's batch (`step_1_tokens`) to
    the largest batch of the plan (`biggest_tokens`: padded batches grow). The headroom is at most half the memory
    the machine gives the GPU beyond that need; the cap is never above the limit there was before."""
    import mlx.core as mx

    from .memory import available_memory

    if usual_limit is None:
        return
    grow = max(biggest_tokens / max(step_1_tokens, 1), 1.0)
    peak = mx.get_peak_memory()
    need = before + (peak - before) * grow
    headroom = RUN_AHEAD_HEADROOM * grow
    room = available_memory()[0]
    if room:
        headroom = min(headroom, max(room - need, 0) / 2)
    mx.set_memory_limit(int(min(need + headroom, usual_limit)))
