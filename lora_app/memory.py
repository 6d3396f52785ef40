"""A memory estimate for a training run, what the machine can give, and the change that makes a run fit.

The estimate is what a LoRA step holds at its peak (the start of the backward pass) as MLX runs it:
- weights: the frozen base as the trainer holds it on the backend (models.load_model): a quantized model stays
  packed on a GPU and is dequantized to float32 on the CPU; any other model keeps its dtype.
- LoRA + optimizer: float32 A and B, their gradients and Adam's two moments: 16 bytes a trainable parameter.
- activations, per token of the widest batch: batch × its width, the bucket (batching.py) of the data's longest row
  capped at max_seq_length. No batch, packed or padded, is wider; a dataset of short rows is far narrower than
  max_seq_length, and where attention scores are kept a block's activations grow with the square of the width.
  * each block the gradient passes through (the first adapted block and those after it; the blocks before it run
    forward only) keeps what its backward reads: its input, queries, keys and values, the second norm's input, the
    MLP's gate and up projections and two products of them (3h + 2kv + 4I values a token), plus the input of each
    adapted group (q/k/v share the normed input; o; gate/up share theirs; down);
  * attention: MLX's CPU backend, and Metal in training, run attention unfused under autodiff: each block keeps its
    softmax (heads × width values a token) and the backward holds two more score-sized arrays. MLX's CUDA backend
    runs cuDNN's fused attention forward and backward (float16/bfloat16, widths that are multiples of 128, heads of
    at most 128 values) and keeps only its output and a float32 log-sum-exp;
  * the backward's working set (one block's gradients, the LoRA products): a multiple of h and of I a token;
  * the loss (head_loss.py): logits and their gradient. On a GPU one chunk's at a time; on the CPU the peak holds
    about two logits-sized arrays of the whole batch, as if every chunk's existed at once;
  * with gradient checkpointing (mlx-lm's grad_checkpoint) each block keeps only its input and one block at a time
    is recomputed with all of the above (on the CPU, only part of it while the whole batch's logits exist).
The counts follow what MLX's autodiff keeps; the two working-set coefficients and the loss's are fitted to bare steps
on the CPU (`bench/memory_estimate.py --sweep`); bench/README.md's table checks the estimate against runs of other
shapes through the trainer, on the CPU and on a GPU.
Imports neither gradio nor (at module level) mlx, so the UI and the model catalog size a run without MLX.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .head_loss import CHUNK_BYTES

GB = 1e9
HEAD_DIM = 64  # when the head count is unknown, assume the common head size
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_MODULES = ("self_attn.q_proj", "self_attn.v_proj")  # LoraConfig's default targets
TIGHT = 0.8  # verdict(): above this share of the available memory a run is "tight"
MEMORY_ADVICE = "Try gradient checkpointing, a smaller batch size, a shorter max sequence length or fewer blocks."


# The backward's working set in values a token, per hidden size and per MLP width: fitted to bare steps on the CPU
# (bench/memory_estimate.py --sweep) and checked on a GPU by the same script's table.
WORK_PER_HIDDEN = 19.0
WORK_PER_INTERMEDIATE = 2.6
# The loss's logits and their gradient: on the CPU every chunk's exist at once (a little under 2 logits-sized
# arrays of the whole batch); on a GPU head_loss.py's ordering keeps one chunk's.
HEAD_ARRAYS_CPU = 1.9
HEAD_ARRAYS_GPU = 2.0
# With gradient checkpointing on the CPU the peak is while the loss's logits are given back and the last block is
# recomputed: the logits and this share of one block's activations (fitted as above; on a GPU they add up).
CPU_CKPT_OVERLAP = 0.43
# With gradient checkpointing on a GPU each block keeps about this many intermediate-sized values a token beyond its
# input: measured on an H100 (bench/README.md's memory table: Qwen2-0.5B bf16 and Llama-8B 4-bit, uniform and packed
# mixed rows, all four fitted within 8% by this one number). Those runs had MLX's CUDA graphs of 1000 MB, which hold
# every buffer of a graph until all of it has run; under the trainer's 100 MB graphs (run_ahead.set_graph_size) the
# 8B at batch 1 needed 8.68 GB against this estimate's 9.22, so the number errs high there until refitted.
GPU_CKPT_KEPT_INTERMEDIATE = 1.1


def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _get(info: Any, name: str, default: Any = 0) -> Any:
    """A field of a ModelInfo, of its to_dict(), or of any object with the same names."""
    value = info.get(name, default) if isinstance(info, dict) else getattr(info, name, default)
    return default if value is None else value


def dtype_bytes_of(info: Any) -> int:
    return DTYPE_BYTES.get(str(_get(info, "dtype", "")).replace("mlx.core.", ""), 2)


def weight_bytes(info: Any, dtype_bytes: int) -> int:
    """The frozen base: packed bits plus a scale and a bias per group when quantized."""
    params = int(_get(info, "total_params"))
    quant = _get(info, "quantization", None)
    if quant:
        bits, group = int(quant.get("bits", 4)), int(quant.get("group_size", 64))
        return int(params * bits / 8 + params / group * 2 * dtype_bytes)
    return params * dtype_bytes


def default_backend() -> str:
    """Where MLX trains on this machine, without importing MLX: 'metal' on Apple Silicon, 'cuda' where MLX's CUDA
    build is installed, else 'cpu'."""
    if sys.platform == "darwin" and os.uname().machine == "arm64":
        return "metal"
    from importlib import metadata

    names = ("mlx-cuda", "mlx-cuda-12", "mlx-cuda-13", "mlx_cuda_12", "mlx_cuda_13")
    for name in names:
        try:
            metadata.distribution(name)
            return "cuda"
        except metadata.PackageNotFoundError:
            continue
    return "cpu"


def backend_name(backend: str | None) -> str:
    """'cpu' | 'cuda' | 'metal'; 'gpu' (the Model step's word) means this machine's GPU backend."""
    if backend in (None, "", "auto"):
        return default_backend()
    if backend == "gpu":
        return "metal" if sys.platform == "darwin" else "cuda"
    if backend not in ("cpu", "cuda", "metal"):
        raise ValueError(f"backend must be cpu, cuda, metal or gpu, got {backend!r}")
    return backend


def training_dtypes(info: Any, backend: str, dequantize: bool | None = None) -> tuple[int, int, bool]:
    """(bytes a weight element, bytes an activation, whether the base stays quantized) as models.load_model
    leaves the model: a quantized base is dequantized by default on the CPU (to float32) and kept on a GPU."""
    base = dtype_bytes_of(info)
    if _get(info, "quantization", None):
        dequantize = backend == "cpu" if dequantize is None else dequantize
        if not dequantize:
            return base, base, True
        return (4, 4, False) if backend == "cpu" else (base, base, False)
    return base, base, False


def batch_width(max_seq_length: int, longest_row: int | None = None) -> int:
    """The widest batch the data gives (batching.BatchPlan.row_length): the bucket of the longest row's inputs
    (its tokens less the last, which is only a target), capped at max_seq_length. Unknown data: max_seq_length."""
    from .batching import bucket_for, bucket_lengths

    max_seq_length = max(int(max_seq_length), 1)
    if not longest_row:
        return max_seq_length
    inputs = max(min(int(longest_row), max_seq_length + 1) - 1, 1)
    return bucket_for(inputs, bucket_lengths(max_seq_length))


@dataclass(frozen=True)
class Shape:
    """The sizes of one block that the activations depend on."""

    hidden: int
    heads: int
    kv: int  # width of the keys (= of the values): kv heads × head size
    head_dim: int
    intermediate: int
    vocab: int
    blocks: int
    shapes: dict  # in-block module path -> [out, in]


def model_shape(info: Any) -> Shape:
    """The block's sizes from the info's keys, its module_shapes, else the usual llama-family ratios."""
    hidden, blocks = int(_get(info, "hidden_size")), int(_get(info, "num_blocks"))
    shapes = dict(_get(info, "module_shapes", {}) or {})

    def out_of(*names: str) -> int:
        return next((int(shapes[k][0]) for k in shapes if k.rsplit(".", 1)[-1] in names), 0)

    head_dim = int(_get(info, "head_dim")) or HEAD_DIM
    heads = int(_get(info, "num_heads")) or max(1, (out_of("q_proj") or hidden) // head_dim)
    kv_heads = int(_get(info, "num_kv_heads"))
    q_width = out_of("q_proj") or heads * (int(_get(info, "head_dim")) or hidden // heads)
    kv = out_of("k_proj") or (kv_heads * q_width // heads if kv_heads else 0)
    if not kv and "qkv_proj" in {k.rsplit(".", 1)[-1] for k in shapes}:
        kv = (out_of("qkv_proj") - q_width) // 2
    intermediate = (int(_get(info, "intermediate_size")) or out_of("gate_proj", "up_proj")
                    or out_of("gate_up_proj") // 2 or 3 * hidden)
    return Shape(hidden, heads, kv or hidden, q_width // heads, intermediate, int(_get(info, "vocab_size")), blocks,
                 shapes)


def lora_kept(shape: Shape, modules: list[str] | tuple[str, ...]) -> int:
    """Values a token each block keeps for the adapters' gradients beyond what its backward reads anyway: the
    input of each adapted group (q/k/v share the normed input; o; gate/up share theirs; down)."""
    names = {m.rsplit(".", 1)[-1] for m in modules}
    h = shape.hidden
    return (h * bool(names & {"q_proj", "k_proj", "v_proj", "qkv_proj"}) + h * ("o_proj" in names)
            + h * bool(names & {"gate_proj", "up_proj", "gate_up_proj"}) + shape.intermediate * ("down_proj" in names))


def estimate_training_memory(info: Any, trainable_params: int, batch_size: int, max_seq_length: int,
                             grad_checkpoint: bool = False, dtype_bytes: int | None = None, *,
                             longest_row: int | None = None, backend: str | None = None,
                             modules: list[str] | tuple[str, ...] | None = None, blocks_trained: int | None = None,
                             dequantize: bool | None = None) -> dict[str, int]:
    """Bytes a run needs at its peak: frozen weights, LoRA weights + gradients + Adam moments (float32),
    activations with and without gradient checkpointing, and the total (see the module's docstring).

    `info` (a dict, a models.ModelInfo or anything with these names): total_params, num_blocks, hidden_size,
    vocab_size, dtype ('bfloat16', 'float16', 'float32'), quantization ({'bits', 'group_size'} or None); optional:
    num_heads (else q_proj's width / 64), num_kv_heads, head_dim, intermediate_size, module_shapes (in-block path ->
    [out, in], as models.inspect_model gives them; the keys' and the MLP's widths are read from it).
    `longest_row`: tokens in the data's longest row (the Data step's tokens_max); None: rows of max_seq_length, an
    upper bound. `backend`: 'cpu', 'cuda', 'metal' or 'gpu' (this machine's GPU); None: this machine's.
    `modules`: the adapted modules (default q_proj and v_proj); `blocks_trained`: blocks from the first adapted one
    to the last (default all). `dequantize`: as the run's setting (None: on the CPU only).
    The result's `width` is the batch width the activations were counted for."""
    backend = backend_name(backend)
    shape = model_shape(info)
    w_bytes, act, quantized = training_dtypes(info, backend, dequantize)
    if dtype_bytes:
        w_bytes = act = dtype_bytes
    width = batch_width(max_seq_length, longest_row)
    tokens = max(int(batch_size), 1) * width
    blocks = shape.blocks if blocks_trained is None else max(0, min(int(blocks_trained), shape.blocks))
    h, inter = shape.hidden, shape.intermediate
    kept_lora = lora_kept(shape, DEFAULT_MODULES if modules is None else modules)

    # Attention: the softmax kept per block and two score-sized arrays in the backward (unfused), or cuDNN's output
    # and float32 log-sum-exp (fused). On the CPU, packed rows of several sequences keep less (span_attention.py);
    # the widest batch is usually its longest sequences alone in their rows, which keep all their scores.
    fused = backend == "cuda" and act == 2 and width % 128 == 0 and shape.head_dim % 8 == 0 and shape.head_dim <= 128
    scores = 0 if fused else shape.heads * width * act
    attention = (h * act + 4 * shape.heads) if fused else scores
    per_block = (3 * h + 2 * shape.kv + 4 * inter + kept_lora) * act + attention
    work = (WORK_PER_HIDDEN * h + WORK_PER_INTERMEDIATE * inter) * act + 2 * scores
    if backend == "cpu":  # float32 logits (head_loss.logits_dtype), every chunk at once
        head = HEAD_ARRAYS_CPU * tokens * shape.vocab * 4
    else:
        head = HEAD_ARRAYS_GPU * min(tokens * shape.vocab * act, CHUNK_BYTES)
    full = tokens * (blocks * per_block + work) + head if blocks else head
    recomputed = tokens * (per_block + work)  # one block, during the backward
    if backend == "cpu":  # the whole batch's logits are freed while the last block is recomputed: they overlap
        recomputed = max(head + CPU_CKPT_OVERLAP * recomputed, recomputed) - head
    kept = h + (0 if backend == "cpu" else GPU_CKPT_KEPT_INTERMEDIATE * inter)  # values a block keeps a token
    checkpointed = tokens * blocks * kept * act + recomputed + head if blocks else head
    lora = 4 * 4 * int(trainable_params)  # weights, gradients, Adam m and v
    weights = weight_bytes(info, w_bytes) if quantized else int(_get(info, "total_params")) * w_bytes
    result = {
        "weights": int(weights),
        "lora_optimizer": lora,
        "activations_full": int(full),
        "activations_checkpointed": int(min(checkpointed, full)),
        "width": width,
    }
    result["activations"] = result["activations_checkpointed" if grad_checkpoint else "activations_full"]
    result["total"] = result["weights"] + lora + result["activations"]
    return result


def verdict(total_bytes: float, available_bytes: float) -> str:
    """'fits', 'tight' (above TIGHT of what is available: other programs and MLX's cache may tip it over) or
    'does not fit'."""
    if total_bytes > available_bytes:
        return "does not fit"
    return "tight" if total_bytes > TIGHT * available_bytes else "fits"


class Change(NamedTuple):
    """A change to a run's settings that fits its memory: what to tell the user, the new estimate, and the settings
    it changes (grad_checkpoint, batch_size, max_seq_length, blocks_trained)."""

    words: str
    estimate: dict[str, int]
    settings: dict[str, Any]


def fitting_change(info: Any, trainable_params: int, batch_size: int, max_seq_length: int, grad_checkpoint: bool,
                   available: float, **kw: Any) -> Change | None:
    """The change that brings the estimate within `available`, or None. Tried in this order, from what changes
    the training least: gradient checkpointing; the largest smaller batch; both (checkpointing with the largest
    batch that fits: a 16 GB Mac training an 8B model lands here); the longest shorter max sequence length (a
    bucket: longer rows are cut); checkpointing with one row and the longest length that fits; the most blocks
    (the last N) that fit, which changes what is trained. `kw`: estimate_training_memory's keyword arguments."""
    from .batching import bucket_lengths

    def attempt(words: str, **settings: Any) -> Change | None:
        args = {"trainable_params": trainable_params, "batch_size": batch_size, "max_seq_length": max_seq_length,
                "grad_checkpoint": grad_checkpoint, **kw, **settings}
        estimate = estimate_training_memory(info, **args)
        return Change(words, estimate, settings) if estimate["total"] <= available else None

    def largest(low: int, high: int, fits: Any) -> int | None:
        """The largest n in [low, high] with fits(n), for fits that hold up to some n and not above."""
        if high < low or not fits(low):
            return None
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low

    def largest_batch(words: str, **settings: Any) -> Change | None:
        """The largest batch below the run's that fits with `settings`."""
        batch = largest(1, int(batch_size) - 1, lambda b: attempt("", batch_size=b, **settings) is not None)
        return attempt(words.format(batch=batch), batch_size=batch, **settings) if batch else None

    def longest(words: str, **settings: Any) -> Change | None:
        """The longest bucket below the data's width that fits with `settings`."""
        width = batch_width(max_seq_length, kw.get("longest_row"))
        for length in sorted((b for b in bucket_lengths(width) if b < width), reverse=True):
            if found := attempt(words.format(length=length), max_seq_length=length, **settings):
                return found
        return None

    ckpt = "gradient checkpointing"
    if not grad_checkpoint and (found := attempt(ckpt, grad_checkpoint=True)):
        return found
    if found := largest_batch("batch size {batch}"):
        return found
    if not grad_checkpoint and (found := largest_batch(ckpt + " and batch size {batch}", grad_checkpoint=True)):
        return found
    if found := longest("max sequence length {length}"):
        return found
    if not grad_checkpoint and (found := longest(ckpt + ", batch size 1 and max sequence length {length}",
                                                 grad_checkpoint=True, batch_size=1)):
        return found
    blocks = int(kw.get("blocks_trained") or model_shape(info).blocks)

    def on_last(n: int) -> Change | None:  # LoRA's parameters scale with the blocks
        return attempt(f"LoRA on the last {n} blocks only (layers last:{n})", blocks_trained=n,
                       trainable_params=int(trainable_params) * n // max(blocks, 1))

    n = largest(1, blocks - 1, lambda n: on_last(n) is not None)
    return on_last(n) if n else None


def available_memory(device: dict | None = None) -> tuple[int, str]:
    """(bytes, where the number comes from) that training may use: the GPU's recommended working set where MLX
    reports one (Apple Silicon), else the GPU's memory (CUDA), else the memory the system has available now, else
    its physical memory. `device`: mx.device_info() as read elsewhere (the UI asks an engine process and does not
    import MLX); this process's MLX is asked when None."""
    if device is None:
        try:
            import mlx.core as mx

            device = mx.device_info() if hasattr(mx, "device_info") else {}
        except Exception:  # noqa: BLE001 - an MLX build without device info
            device = {}
    size, source = device_memory(device)
    if size:
        return size, source
    free, source = system_memory_available()
    if free:
        return free, source
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system memory (os.sysconf)"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


def device_memory(device: dict) -> tuple[int, str]:
    """(bytes, source) of the GPU's memory as mx.device_info() reports it: Metal's recommended working set (else its
    memory size), or the card's memory on CUDA (MLX's CUDA backend names it total_memory); (0, '') on the CPU."""
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if device.get(key):
            return int(device[key]), f"mx.device_info()['{key}']"
    return 0, ""


def system_memory_available() -> tuple[int, str]:
    """(bytes, source) the system can give now: Linux's MemAvailable, else its free pages; (0, '') where the OS
    does not say (macOS)."""
    meminfo = meminfo_available()
    if meminfo:
        return meminfo, "/proc/meminfo MemAvailable"
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages (os.sysconf)"
    except (ValueError, OSError, AttributeError):
        return 0, ""


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def parts_text(estimate: dict[str, int]) -> str:
    """'about X (weights W, activations A)': LoRA and the optimizer count with the weights."""
    return (f"about {human(estimate['total'])} (weights {human(estimate['weights'] + estimate['lora_optimizer'])}, "
            f"activations {human(estimate['activations'])})")


def memory_warning(estimate: dict[str, int], available: int, source: str = "", limit: int = 0,
                   change: Change | None = None) -> str | None:
    """A plain warning when the estimate exceeds what the machine (or the memory limit) gives, else None;
    `change`: fitting_change()'s answer for that budget."""
    budget, where = available, source or "available memory"
    if limit and (not budget or limit < budget):
        budget, where = limit, "the memory limit (memory_limit_gb)"
    if not budget or estimate["total"] <= budget:
        return None
    advice = (f"With {change.words} it would need {parts_text(change.estimate)}." if change else
              f"None of the changes the app tries fits it: {MEMORY_ADVICE}")
    return f"this run may need {parts_text(estimate)}, more than the {human(budget)} from {where}. {advice}"


def lora_targets(model: Any) -> tuple[list[str], int]:
    """(adapted in-block module paths, blocks from the first adapted one to the last) of a model with LoRA."""
    from .models import blocks_of

    blocks = blocks_of(model)
    adapted: list[int] = []
    names: set[str] = set()
    for i, block in enumerate(blocks):
        found = [name for name, m in block.named_modules() if hasattr(m, "lora_a")]
        if found:
            adapted.append(i)
            names.update(found)
    return sorted(names), (len(blocks) - adapted[0]) if adapted else 0


def model_estimate_inputs(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(info, keyword arguments) for estimate_training_memory from a loaded model with its adapters: its sizes,
    the backend it trains on, the adapted modules and how many blocks the gradient passes through."""
    import mlx.core as mx

    from .models import inspect_model

    args = getattr(model, "args", None)
    info = {**inspect_model(model).to_dict(), "num_heads": int(getattr(args, "num_attention_heads", 0) or 0),
            "num_kv_heads": int(getattr(args, "num_key_value_heads", 0) or 0)}
    modules, blocks_trained = lora_targets(model)
    backend = "cpu" if mx.default_device() == mx.cpu else ("metal" if mx.metal.is_available() else "cuda")
    # dequantize=False: the model is loaded, its dtypes are the ones it trains in
    return info, {"backend": backend, "modules": modules, "blocks_trained": blocks_trained, "dequantize": False}


def check_model(model: Any, trainable_params: int, batch_size: int, width: int, grad_checkpoint: bool,
                limit: int = 0) -> tuple[str, str | None, dict[str, int]]:
    """For the trainer: (an info line, a warning or None, the estimate) for a loaded model with its adapters,
    at the widest batch its data gives (`width`: BatchPlan.row_length(), at most max_seq_length)."""
    info, kw = model_estimate_inputs(model)
    estimate = estimate_training_memory(info, trainable_params, batch_size, width, grad_checkpoint, **kw)
    available, source = available_memory()
    budget = min(b for b in (available, limit) if b) if (available or limit) else 0
    change = (fitting_change(info, trainable_params, batch_size, width, grad_checkpoint, budget, **kw)
              if budget and estimate["total"] > budget else None)
    line = (f"memory estimate: {parts_text(estimate)} at batch {batch_size} × {width} tokens; "
            f"{human(available)} available ({source})")
    return line, memory_warning(estimate, available, source, limit, change), estimate
