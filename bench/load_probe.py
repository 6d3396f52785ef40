"""Where loading a model folder spends its time: the bytes off the disk, MLX's load, mlx-lm's steps, the tokenizer,
and the engine's load_model (what session.prepare's `model` phase times).

    python3 bench/load_probe.py MODEL_DIR        # e.g. the folder bench/qlora_8b.py builds

Each phase runs once, in this order, in one process; the file read comes first so that it meets the disk (drop the
page cache before, where the machine allows it: `sync; echo 3 > /proc/sys/vm/drop_caches`), and every later phase
reads the file from the page cache.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# transformers imports PyTorch whenever it can find it; the app's install has none (requirements-reference.txt)
NO_TORCH = "import sys; sys.modules['torch'] = None; "


def timed(label: str, fn, size: int = 0):
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    rate = f" ({size / seconds / 1e9:.2f} GB/s)" if size else ""
    print(f"{label:<46} {seconds:7.2f} s{rate}", flush=True)
    return result


def read_bytes(files: list[Path]) -> None:
    for f in files:
        with f.open("rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    folder = Path(sys.argv[1])
    files = sorted(folder.glob("model*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"{folder}: {len(files)} file(s), {size / 1e9:.2f} GB")
    timed("read the files (first read: the disk)", lambda: read_bytes(files), size)
    for label, code in (("import mlx_lm (a fresh process)", ""), ("  the same with PyTorch hidden", NO_TORCH)):
        timed(label, lambda code=code: subprocess.run([sys.executable, "-c", code + "import mlx_lm.utils"], check=True))
    timed("read the files again (page cache)", lambda: read_bytes(files), size)
    mx = timed("import mlx.core", lambda: __import__("mlx.core").core)
    print(f"device: {mx.default_device()}")

    def mlx_load():
        weights = {}
        for f in files:
            weights.update(mx.load(str(f)))
        mx.eval(weights)
        return weights

    weights = timed("mx.load + eval (to the default device)", mlx_load, size)
    timed("one GPU pass over those arrays (sum)", lambda: mx.eval([w.sum() for w in weights.values()]), size)
    timed("import mlx_lm", lambda: __import__("mlx_lm.utils"))
    from mlx_lm.utils import load_model, load_tokenizer

    model, _ = timed("mlx_lm load_model(lazy=True): build + quantize", lambda: load_model(folder, lazy=True))
    timed("  eval its parameters (the weights' read)", lambda: mx.eval(model.parameters()), size)
    timed("mlx_lm load_tokenizer", lambda: load_tokenizer(folder))
    from lora_app.models import load_model as engine_load

    timed("lora_app.models.load_model (the whole phase)", lambda: engine_load(str(folder)), size)


if __name__ == "__main__":
    main()
