"""How often MLX's CUDA allocator goes to the driver during training, under the engine's run-ahead memory bound
and without it (issue 8: the bound costs ~15% of the unbounded speed on the H200, bench/RESULTS.md).

    python3 bench/alloc_calls.py --label bound  -- train --model M --data D ... --out RUN1
    python3 bench/alloc_calls.py --label free   -- train --model M --data D ... --memory-limit-gb 100 --out RUN2

Runs the CLI in this process under PyTorch's profiler, whose CUPTI trace also sees MLX's CUDA runtime and driver
calls, and prints one RESULT line: the calls per training step by name (the 25 most frequent). What it showed
(bench/RESULTS.md, seventh session): on a cache miss MLX's CUDA allocator first returns cached buffers to the
device pool when active + cached memory would pass the memory limit, and under the bound, which keeps active
memory near that limit, this happens a few hundred times a step (cudaMallocAsync / cudaFreeAsync).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the lora_app command line")
    a = ap.parse_args()
    cli = a.cli[1:] if a.cli[:1] == ["--"] else a.cli

    import os

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from lora_app.__main__ import main as lora_main
    from lora_app.runs import read_events

    os.environ["LORA_APP_NO_OPENBLAS"] = "1"  # the CLI would re-exec itself to preload OpenBLAS, out of the profiler
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU  # CPU: a code check
    with profile(activities=[activity]) as prof:
        rc = lora_main(cli)
    run_dir = Path(cli[cli.index("--out") + 1])
    train = [e for e in read_events(run_dir) if e["event"] == "train"]
    steps = train[-1]["step"] if train else 1
    calls = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CPU)  # runtime/driver API calls
    kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    print("RESULT " + json.dumps({
        "label": a.label, "rc": rc, "steps": steps, "kernels_per_step": round(kernels / steps, 1),
        "peak_gb": max((e["peak_memory_gb"] for e in train), default=None),
        "calls_per_step": {k: round(v / steps, 2) for k, v in calls.most_common(25)}}), flush=True)


if __name__ == "__main__":
    main()
