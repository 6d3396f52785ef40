"""Bounding how far a training process encodes GPU work ahead of the GPU, on MLX's CUDA backend, by graph size.

MLX allocates a kernel's buffers when the host encodes it and frees them once the GPU has run it, so the further
the host runs ahead, the higher the peak. Its CUDA backend records kernels into CUDA graphs, commits one every
MLX_MAX_OPS_PER_BUFFER kernels (20 by default), and its eval waits while more than 10 committed graphs are in
flight: the graphs' size is a bound on the run-ahead, counted in kernels. At the default the 0.5B model's step
(8 x 512, H200; bench/RESULTS.md, eighth session) peaked at 13.4 GB; with graphs of 5 kernels at 8.6 GB and 10%
faster than the engine's other bound, MLX's memory limit (Trainer.bound_run_ahead), under which MLX's allocator
returns its cache to the device on every miss.

MLX reads the variable when it sets up its GPU stream, so `use_small_graphs` runs before mlx is imported: at the
start of the `train` command, in the process that trains. A size the user set is left alone, and then the memory
limit bounds the run-ahead as everywhere else (Metal, or a process that imported MLX already).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import distributions

GRAPH_SIZE_VARIABLE = "MLX_MAX_OPS_PER_BUFFER"
KERNELS_PER_GRAPH = 6
# Set along with the size, so that the processes a distributed run launches know the size is this module's choice.
SET_HERE = "LORA_APP_SMALL_GRAPHS"


def mlx_cuda_installed() -> bool:
    """Whether MLX's CUDA backend is installed (`mlx[cuda]` brings a package named mlx-cuda-<version>)."""
    if platform.system() != "Linux":
        return False
    names = ((d.metadata["Name"] or "").lower().replace("_", "-") for d in distributions())
    return any(name.startswith("mlx-cuda") for name in names)


def use_small_graphs() -> bool:
    """Before MLX is imported: on its CUDA backend, unless the user set a graph size, commit a CUDA graph every
    KERNELS_PER_GRAPH kernels. True when this bound is in force."""
    if "mlx.core" in sys.modules:
        return False
    if os.environ.get(SET_HERE) == "1":
        return True
    if GRAPH_SIZE_VARIABLE in os.environ or not mlx_cuda_installed():
        return False
    os.environ.update({GRAPH_SIZE_VARIABLE: str(KERNELS_PER_GRAPH), SET_HERE: "1"})
    return True


def small_graphs_note() -> str:
    """What a run's log says when this bound is in force."""
    return (f"run-ahead bounded by CUDA graphs of {os.environ.get(GRAPH_SIZE_VARIABLE)} kernels "
            f"({GRAPH_SIZE_VARIABLE}), not by a memory limit")
