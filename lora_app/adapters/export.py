"""Export an adapter for other tools, each export checked after it is written (check.py, check.json in the folder):

    mlx   a fused model folder (LM Studio, mlx-lm, any MLX tool), optionally re-quantized to 4 or 8 bits with
          mlx-lm's own quantization; checked: its logits against base + adapter
    gguf  a GGUF for Ollama / llama.cpp from llama.cpp's own converter (gguf.py), with a Modelfile (modelfile.py);
          checked: the fuse as above, and the GGUF's tensors read back against the fused weights. For the families
          Ollama imports adapters of and the converter does not cover (ollama_adapter.py: gemma2, mixtral), the
          adapter itself instead: PEFT, the same file in a folder Ollama reads, a Modelfile with an ADAPTER line;
          checked: PEFT read back, every tensor named as Ollama's converter expects
    peft  Hugging Face PEFT (peft.py's mapping); checked: the written tensors read back equal the adapter's

`fused` is the old name of `mlx`. Exports never overwrite: they are written into a temporary folder next to the
target and renamed onto it at the end, so a crash leaves no half-written folder and an existing non-empty folder
is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..fileio import atomic_write, atomic_write_json, fsync_dir
from .check import compare_logits, read_check, write_check
from .fuse import fused_model, model_config
from .gguf import GGUFError, compare_tensors, convert, setup_problem
from .loader import read_tensors
from .modelfile import write_adapter_modelfile, write_modelfile
from .ollama_adapter import (
    OLLAMA_DIR,
    PEFT_DIR,
    base_problem,
    gguf_format_problem,
    ollama_check,
    tensor_problem,
    write_ollama_folder,
    writes_adapter,
)
from .peft import from_peft_tensors, peft_config_for, peft_name, to_peft_tensors
from .reader import CONFIG_FILE, PEFT_WEIGHTS, base_model_of, is_peft_folder, read_adapter, tensor_shapes

FORMATS = ("mlx", "gguf", "peft")
ALIASES = {"fused": "mlx"}  # the name before GGUF and quantized exports existed
QUANTIZE = (4, 8)
GROUP_SIZE = 64  # mlx-lm's default for affine 4- and 8-bit, for a float base


class ExportError(ValueError):
    """An export that cannot be written; the message names the folder and what to do instead."""


def export_adapter(adapter_dir: Path, fmt: str, out: Path, model: str | None = None, dequantize: bool = False,
                   quantize: int | None = None, ollama_base: str | None = None) -> Path:
    """Write `adapter_dir` (ours, mlx-lm's, or PEFT for mlx/gguf) to the new folder `out` as `fmt`; returns `out`.
    The folder's check.json holds the checks made after writing. `ollama_base`: the FROM of the Modelfile when
    --format gguf writes an adapter for Ollama."""
    fmt = ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"--quantize {quantize}: choose 4 or 8 bits")
    if ollama_base is not None and fmt != "gguf":
        raise ExportError("--ollama-base applies to --format gguf only (the base model of an adapter for Ollama)")
    if fmt == "peft":
        if dequantize or quantize:
            raise ExportError("--dequantize and --quantize apply to --format mlx and gguf only (a PEFT adapter has "
                              "no base weights)")
        return export_peft(Path(adapter_dir), Path(out), base_model=model)
    if fmt == "gguf":
        return export_gguf(Path(adapter_dir), Path(out), model=model, quantize=quantize, ollama_base=ollama_base)
    return fuse_adapter(Path(adapter_dir), Path(out), model=model, dequantize=dequantize, quantize=quantize)


def export_peft(adapter_dir: Path, out: Path, base_model: str | None = None) -> Path:
    """Write `out`/adapter_model.safetensors + adapter_config.json from our (or mlx-lm's) adapter folder."""
    import mlx.core as mx

    if is_peft_folder(adapter_dir):
        raise ExportError(f"{adapter_dir}: already a PEFT adapter; copy the folder instead")
    settings = read_adapter(adapter_dir)
    weights = read_tensors(settings.weights)  # a torn file: one line, and nothing is written
    tensors = to_peft_tensors(weights, adapter_dir)
    peft_config = peft_config_for(settings, weights, base_model or settings.base_model or None)
    with new_folder(out) as tmp:
        atomic_write(tmp / PEFT_WEIGHTS, lambda p: mx.save_safetensors(str(p), tensors, metadata={"format": "pt"}))
        atomic_write_json(tmp / CONFIG_FILE, peft_config)
        write_check(tmp, {"peft": peft_check(tmp, weights)})
    return Path(out)


def peft_check(folder: Path, weights: dict) -> dict:
    """The written PEFT file read back and mapped to mlx-lm's names: every tensor equal to the adapter's."""
    import mlx.core as mx

    back = from_peft_tensors(read_tensors(folder / PEFT_WEIGHTS), folder)
    same = set(back) == set(weights) and all(mx.array_equal(back[k], weights[k]).item() for k in weights)
    return {"check": "PEFT tensors read back", "tensors": len(back), "ok": bool(same),
            "summary": f"PEFT file read back: {len(back)} tensors " + ("equal the adapter's" if same else
                                                                       "DIFFER from the adapter's")}


def fuse_adapter(adapter_dir: Path, out: Path, model: str | None = None, dequantize: bool = False,
                 quantize: int | None = None) -> Path:
    """Merge the adapter into the base weights and write the model folder `out` (config, tokenizer with its chat
    template, weights): float with `dequantize`, re-quantized to `quantize` bits by mlx-lm, else the base's own
    quantization. Then the folder's logits are checked against base + adapter (check.json)."""
    from mlx_lm.utils import quantize_model, save

    if dequantize and quantize:
        raise ExportError("choose --dequantize (float weights) or --quantize BITS, not both")
    base = base_of(adapter_dir, model)
    from ..models import resolve_model

    own = model_config(resolve_model(base), dequantize=False).get("quantization") or {}
    # A base already at `quantize` bits keeps its untouched layers' weights exactly; re-quantizing the whole
    # de-quantized model moves every weight onto a new grid (bench/README.md, export tolerance).
    requantize = bool(quantize) and quantize != own.get("bits")
    mlx_model, tokenizer, path, config = fused_model(Path(adapter_dir), base, dequantize or requantize)
    if requantize:
        mlx_model, config = quantize_model(mlx_model, config, own.get("group_size", GROUP_SIZE), quantize)
    with new_folder(out) as tmp:
        save(tmp, path, mlx_model, tokenizer, config, donate_model=True)
        del mlx_model
        write_check(tmp, {"fuse": compare_logits(tmp, Path(adapter_dir), base)})
    return Path(out)


def export_gguf(adapter_dir: Path, out: Path, model: str | None = None, quantize: int | None = None,
                ollama_base: str | None = None) -> Path:
    """The adapter fused into float weights, converted by llama.cpp's converter to out/<name>.gguf (16-bit, or
    Q8_0 with quantize=8), read back and compared; plus a Modelfile for `ollama create`. For a family Ollama
    imports adapters of instead (export_ollama_adapter), the adapter and a Modelfile with an ADAPTER line. Families
    neither covers, and a missing converter, are refused before anything is written."""
    from ..models import resolve_model

    base = base_of(adapter_dir, model)
    config = model_config(resolve_model(base), dequantize=False)
    if writes_adapter(config):
        return export_ollama_adapter(adapter_dir, out, base, config, quantize, ollama_base)
    problem = gguf_format_problem(config, quantize) or setup_problem()
    if problem:
        raise ExportError(problem)
    if ollama_base is not None:
        raise ExportError(f"--ollama-base: a {config.get('model_type')} model is exported as a whole GGUF, which "
                          "needs no base model in Ollama; leave --ollama-base out")
    check_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.fused-"))
    try:
        fused = fuse_adapter(Path(adapter_dir), work / "fused", model=base, dequantize=True)
        with new_folder(out) as tmp:
            gguf_file = tmp / f"{out.name}.gguf"
            try:
                convert(fused, gguf_file, quantize)
            except GGUFError as e:
                raise ExportError(str(e)) from None
            from mlx_lm.tokenizer_utils import load as load_tokenizer

            ollama = write_modelfile(tmp, gguf_file.name, load_tokenizer(fused), out)
            write_check(tmp, {"fuse": read_check(fused)["fuse"], "gguf": compare_tensors(gguf_file, fused),
                              "modelfile": ollama})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def export_ollama_adapter(adapter_dir: Path, out: Path, base: str, config: dict, quantize: int | None = None,
                          ollama_base: str | None = None) -> Path:
    """For a family llama.cpp's converter does not cover but Ollama imports adapters of: out/peft (the PEFT export,
    read back), out/ollama-adapter (the same file under the name Ollama looks for) and a Modelfile FROM
    `ollama_base` (a placeholder when None) with ADAPTER ./ollama-adapter. Everything Ollama would refuse is
    refused here before anything is written."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from ..models import resolve_model

    if is_peft_folder(adapter_dir):
        raise ExportError(f"{adapter_dir}: already a PEFT adapter; put it in a folder as model.safetensors with its "
                          "adapter_config.json and write the Modelfile's ADAPTER line yourself")
    settings = read_adapter(adapter_dir)
    names = [peft_name(n) or n for n in tensor_shapes(settings.weights)]  # the header: no tensors loaded
    problem = (gguf_format_problem(config, quantize) or base_problem(ollama_base)
               or tensor_problem(names, settings.alpha))
    if problem:
        raise ExportError(problem)
    with new_folder(out) as tmp:
        peft_dir = export_peft(adapter_dir, tmp / PEFT_DIR, base_model=base)
        ollama_dir = write_ollama_folder(peft_dir, tmp / OLLAMA_DIR)
        tokenizer = load_tokenizer(Path(resolve_model(base)))
        bits = (config.get("quantization") or {}).get("bits")
        modelfile = write_adapter_modelfile(tmp, OLLAMA_DIR, ollama_base, base, tokenizer, out, bits)
        write_check(tmp, {"ollama_adapter": ollama_check(ollama_dir, peft_dir, config["model_type"]),
                          "peft": read_check(peft_dir)["peft"], "modelfile": modelfile})
    return Path(out)


def base_of(adapter_dir: Path, model: str | None) -> str:
    base = model or base_model_of(adapter_dir)
    if not base:
        raise ExportError(f"{adapter_dir}: the adapter config does not name its base model; pass --model BASE")
    return base


def check_free(out: Path) -> None:
    """Refuse a target that holds anything: an export or a copy never overwrites a user's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out}: folder exists and is not empty; choose a new or empty folder "
                          "(nothing is ever overwritten)")


@contextlib.contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; it becomes `out` only if the block completes."""
    out = Path(out)
    check_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.writing-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is ordinary data
        try:
            os.replace(tmp, out)  # replaces only a missing or empty folder (POSIX), so never overwrites
        except OSError as e:
            raise ExportError(f"{out}: could not be written ({e.strerror}); was it filled meanwhile?") from None
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
