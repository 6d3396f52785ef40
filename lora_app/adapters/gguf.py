"""GGUF for Ollama and llama.cpp: llama.cpp's own converter run on our de-quantized fused folder, then the file is
read back with llama.cpp's `gguf` package and every tensor compared with the fused weights.

The converter is llama.cpp's `convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/` folders, as shipped in
llama-cpp-python's source release on PyPI (CONVERTER: version and sha256 pinned). `python -m lora_app setup-gguf`
fetches that release with pip, checks its hash and unpacks those files alone into the app's data folder
(converter_dir()); none of its code is copied into this repository. The converter imports PyTorch (CPU is
enough); setup-gguf installs requirements-gguf.txt's pins into `<venv>/reference`, apart from the app's packages,
where the tests' PyTorch also lives. The read-back uses the `gguf` package pinned in requirements.txt.

Families (FAMILIES): the model types whose mlx-lm weights keep the Hugging Face names and layout the converter
reads, and whose tensors the check below maps back. For anything else --format gguf writes an adapter that Ollama
converts itself where Ollama can (ollama_adapter.py), and is refused before anything is written where it cannot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

CONVERTER = ("llama-cpp-python", "0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")  # under vendor/llama.cpp/ in the release
# model_type -> (GGUF architecture, whether llama.cpp permutes the rows of q_proj / k_proj for its rope)
FAMILIES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
            "qwen3": ("qwen3", False)}
OUTTYPES = {None: "auto", 8: "q8_0"}  # auto: the fused weights' 16-bit type; 4 bits needs llama-quantize
REQUIREMENTS = Path(__file__).resolve().parent.parent.parent / "requirements-gguf.txt"


class GGUFError(ValueError):
    """A GGUF export that cannot be done here; the message says why and what to do."""


def family_problem(config: dict, quantize: int | None = None) -> str | None:
    """Why this model cannot become a GGUF here (checked before anything is written), or None. The whole answer
    for --format gguf, Ollama's adapter import included, is ollama_adapter.gguf_format_problem."""
    kind = config.get("model_type", "?")
    if kind not in FAMILIES:
        return (f"GGUF export covers the model families {', '.join(sorted(FAMILIES))}; this model is {kind!r}. "
                "Export --format mlx (LM Studio, mlx-lm) or --format peft instead")
    if quantize not in OUTTYPES:
        return (f"GGUF export writes 16-bit or 8-bit (Q8_0) weights; {quantize}-bit needs llama.cpp's llama-quantize "
                "afterwards (ollama create --quantize q4_K_M does it too)")
    return None


# ---- the converter ------------------------------------------------------------------------------------------

def converter_dir() -> Path:
    from ..demo import app_home

    return app_home() / "llama.cpp" / f"{CONVERTER[0]}-{CONVERTER[1]}"


def torch_folder() -> Path | None:
    """The folder that holds PyTorch for the converter: where this process finds it, or <venv>/reference;
    None when neither has it."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent.parent
    reference = Path(sys.prefix) / "reference"
    return reference if (reference / "torch").is_dir() else None


def setup_problem() -> str | None:
    """What is missing for a GGUF export (the converter, PyTorch), or None."""
    missing = []
    if not (converter_dir() / PARTS[0]).is_file():
        missing.append(f"llama.cpp's converter ({CONVERTER[0]} {CONVERTER[1]}'s source release)")
    if torch_folder() is None:
        missing.append("PyTorch, which the converter imports")
    if missing:
        return f"GGUF export needs {' and '.join(missing)}: run `python -m lora_app setup-gguf` once"
    return None


def setup(log: Any = print) -> Path:
    """Fetch the pinned source release with pip, check its sha256, unpack the converter's files into
    converter_dir(); install PyTorch into <venv>/reference when no PyTorch is found. Returns the converter's folder."""
    name, version, sha256 = CONVERTER
    target = converter_dir()
    if not (target / PARTS[0]).is_file():
        with tempfile.TemporaryDirectory() as tmp:
            log(f"Fetching {name}=={version}'s source release (about 75 MB) for llama.cpp's converter ...")
            pip(["download", "--no-deps", "--no-binary", ":all:", f"{name}=={version}", "-d", tmp])
            archives = list(Path(tmp).glob("*.tar.gz"))
            if len(archives) != 1:
                raise GGUFError(f"pip download {name}=={version} gave {[a.name for a in archives]}, not one source "
                                "release")
            got = hashlib.sha256(archives[0].read_bytes()).hexdigest()
            if got != sha256:
                raise GGUFError(f"{archives[0].name}: sha256 {got}, expected {sha256}; not unpacked")
            unpack(archives[0], target)
        log(f"llama.cpp's converter is in {target}")
    if torch_folder() is None:
        reference = Path(sys.prefix) / "reference"
        log(f"Installing PyTorch for the converter into {reference} ({REQUIREMENTS.name}) ...")
        pip(["install", "--no-deps", "--upgrade", "--target", str(reference), "-r", str(REQUIREMENTS)])
    return target


def pip(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise GGUFError(f"pip {args[0]} failed: {last}")


def unpack(archive: Path, target: Path) -> None:
    """Only PARTS, only regular files and folders (no links, nothing outside the target), then one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpacking-"))
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/vendor/llama.cpp/", 1)
                rel = inner[1] if len(inner) == 2 else ""
                if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in PARTS):
                    continue
                if not (member.isfile() or member.isdir()) or ".." in Path(rel).parts:
                    continue
                dest = tmp / rel
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        try:
            os.replace(tmp, target)
        except OSError:  # another process (a second app, a parallel test) unpacked it first
            if not (target / PARTS[0]).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(fused_dir: Path, out_file: Path, quantize: int | None = None, timeout: float = 3600) -> None:
    """llama.cpp's convert_hf_to_gguf.py on the fused folder, in its own process (it imports PyTorch)."""
    problem = setup_problem()
    if problem:
        raise GGUFError(problem)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(torch_folder())]))
    script = converter_dir() / PARTS[0]
    cmd = [sys.executable, str(script), str(fused_dir), "--outfile", str(out_file), "--outtype", OUTTYPES[quantize]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or not Path(out_file).is_file():
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise GGUFError(f"llama.cpp's converter failed: {lines[-1] if lines else f'exit code {done.returncode}'}")


# ---- read back and compare ----------------------------------------------------------------------------------

def compare_tensors(gguf_file: Path, fused_dir: Path) -> dict[str, Any]:
    """Every tensor of the GGUF (read by llama.cpp's `gguf` reader) against the fused weights it came from: the
    names map both ways, the shapes are equal, and each value is within its GGUF type's rounding (F16, BF16:
    half an ulp; Q8_0: 0.57 of the block's step, amax / 127 with the step itself stored in float16)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_file))
    arch = str(reader.fields["general.architecture"].contents())
    blocks = int(reader.fields[f"{arch}.block_count"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    n_kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), blocks)
    fused = fused_weights(fused_dir)
    to_gguf = {}
    for name in fused:
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            to_gguf[mapped] = name
    permute = next((p for a, p in FAMILIES.values() if a == arch), False)
    problems, worst, types, compared = [], 0.0, set(), 0
    for t in reader.tensors:
        source = to_gguf.get(t.name)
        if source is None:
            problems.append(f"{t.name}: no fused tensor maps to it")
            continue
        want = fused[source]
        got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(
            [int(n) for n in t.shape])))
        if got.shape != want.shape:
            problems.append(f"{t.name}: shape {got.shape}, fused {source} has {want.shape}")
            continue
        if permute and source.endswith(("q_proj.weight", "k_proj.weight")):
            want = llama_permute(want, n_head if "q_proj" in source else n_kv)
        error = np.abs(got - want)
        ratio = float((error / bound(want, t.tensor_type.name)).max()) if error.any() else 0.0
        worst = max(worst, ratio)
        types.add(t.tensor_type.name)
        compared += 1
        if ratio > 1:
            problems.append(f"{t.name}: differs from {source} by {ratio:.3g}x its {t.tensor_type.name} rounding")
    covered = set(to_gguf.values())
    dropped = sorted(n for n in fused if n not in covered and not n.endswith("rotary_emb.inv_freq"))
    problems += [f"{n}: not in the GGUF" for n in dropped]
    return {"check": "GGUF tensors vs fused weights", "architecture": arch, "tensors": compared,
            "types": sorted(types), "worst_error_vs_rounding": worst, "problems": problems[:20],
            "ok": not problems and compared > 0,
            "summary": f"GGUF read back by gguf: {compared} tensors ({', '.join(sorted(types))}) match the fused "
                       f"weights' names and shapes, values within {worst:.2f}x their rounding"
                       + ("" if not problems else f"; {len(problems)} problems, e.g. {problems[0]}")}


def llama_permute(w: Any, n_head: int) -> Any:
    """llama.cpp's row order for q_proj / k_proj (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bound(w: Any, kind: str) -> Any:
    """Largest rounding error of each value stored as `kind`, never zero (an exact match gives ratio 0)."""
    import numpy as np

    tiny = np.float32(2.0**-24)
    if kind == "F16":
        return np.abs(w) * 2.0**-11 + tiny
    if kind == "BF16":
        return np.abs(w) * 2.0**-8 + tiny
    if kind == "Q8_0":
        blocks = w.reshape(*w.shape[:-1], -1, 32)
        step = np.abs(blocks).max(axis=-1, keepdims=True) / 127
        return np.broadcast_to(step * 0.57 + tiny, blocks.shape).reshape(w.shape)
    return np.abs(w) * 2.0**-23 + tiny  # F32 (and anything else: as exact as float32)


def fused_weights(folder: Path) -> dict[str, Any]:
    """The fused folder's tensors as float32 numpy arrays (bfloat16 has no numpy type, so through MLX)."""
    import mlx.core as mx
    import numpy as np

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for name, w in mx.load(str(path)).items():
            out[name] = np.array(w.astype(mx.float32))
    return out
