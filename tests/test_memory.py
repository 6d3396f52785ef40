"""The memory estimate against hand-computed numbers, the warning, and out-of-memory errors as plain advice."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_app import memory, runs, trainer
from lora_app.config import RunConfig
from lora_app.memory import (
    available_memory,
    estimate_training_memory,
    fitting_change,
    memory_warning,
    verdict,
    weight_bytes,
)
from lora_app.trainer import describe_failure

INFO = {"total_params": 1000, "num_blocks": 2, "hidden_size": 64, "vocab_size": 100, "num_heads": 4,
        "dtype": "float32"}
# `python -m lora_app inspect --model demo` (SmolLM2-135M, 4-bit), as the Adapter step gets it.
DEMO_SHAPES = {"self_attn.q_proj": [576, 576], "self_attn.k_proj": [192, 576], "self_attn.v_proj": [192, 576],
               "self_attn.o_proj": [576, 576], "mlp.gate_proj": [1536, 576], "mlp.up_proj": [1536, 576],
               "mlp.down_proj": [576, 1536]}
DEMO_INFO = {"num_blocks": 30, "total_params": 134_515_008, "hidden_size": 576, "vocab_size": 49152,
             "dtype": "float16", "quantization": {"bits": 4, "group_size": 32}, "linear_modules": sorted(DEMO_SHAPES),
             "module_shapes": DEMO_SHAPES}
QV = ["self_attn.q_proj", "self_attn.v_proj"]
DEMO_TRAINABLE = 460_800  # rank 8 on q and v of 30 blocks, as the demo run reports


def test_estimate_components_by_hand() -> None:
    """CPU, float32: the kept values of each block, the softmax, the working set and the logits, counted by hand."""
    est = estimate_training_memory(INFO, trainable_params=500, batch_size=2, max_seq_length=32, backend="cpu")
    tokens, h, kv, inter = 2 * 32, 64, 64, 3 * 64  # no module shapes: keys as wide as h, MLP 3h
    per_block = (3 * h + 2 * kv + 4 * inter + h) * 4 + 4 * 32 * 4  # + q/v's input; softmax of 4 heads × 32 keys
    work = (memory.WORK_PER_HIDDEN * h + memory.WORK_PER_INTERMEDIATE * inter) * 4 + 2 * 4 * 32 * 4
    head = memory.HEAD_ARRAYS_CPU * tokens * 100 * 4
    assert est["weights"] == 1000 * 4 and est["width"] == 32
    assert est["lora_optimizer"] == 500 * 4 * 4  # weights, gradients, Adam m and v
    assert est["activations_full"] == int(tokens * (2 * per_block + work) + head)
    one_block = tokens * (per_block + work)  # recomputed in the backward, partly while the logits exist (CPU)
    recomputed = max(head + memory.CPU_CKPT_OVERLAP * one_block, one_block)
    assert est["activations_checkpointed"] == int(tokens * 2 * h * 4 + recomputed)
    assert est["total"] == 4000 + 8000 + est["activations_full"]
    ckpt = estimate_training_memory(INFO, 500, 2, 32, grad_checkpoint=True, backend="cpu")
    assert ckpt["activations"] == est["activations_checkpointed"] < est["activations_full"]


def test_a_gpu_holds_one_chunk_of_a_large_vocabulary() -> None:
    """Qwen2's 151,936 words at 8 x 1024 tokens: on a GPU the loss holds one chunk of logits (and its gradient),
    not all 8192 rows (2.5 GB in bfloat16); the CPU's peak holds the whole batch's (measured)."""
    from lora_app.head_loss import CHUNK_BYTES

    info = {**INFO, "dtype": "bfloat16"}
    for backend, extra in (("cuda", memory.HEAD_ARRAYS_GPU * (CHUNK_BYTES - 8 * 1024 * 100 * 2)),
                           ("cpu", memory.HEAD_ARRAYS_CPU * 8 * 1024 * (151936 - 100) * 4)):
        large, small = (estimate_training_memory({**info, "vocab_size": v}, 0, 8, 1024, backend=backend)
                        for v in (151936, 100))
        assert large["activations"] - small["activations"] == pytest.approx(extra, abs=2)


def test_cuda_fused_attention_keeps_no_scores() -> None:
    """cuDNN's attention (bf16, widths that are multiples of 128): doubling the width doubles the activations; the
    CPU's unfused attention keeps the softmax, which grows with the width's square."""
    info = {**DEMO_INFO, "dtype": "bfloat16", "quantization": None}
    cuda = [estimate_training_memory(info, 0, 1, w, backend="cuda")["activations"] for w in (1024, 2048)]
    cpu = [estimate_training_memory(info, 0, 1, w, backend="cpu")["activations"] for w in (1024, 2048)]
    assert cuda[1] / cuda[0] == pytest.approx(2, rel=0.05) and cpu[1] / cpu[0] > 2.4


def test_quantized_weights_and_defaults() -> None:
    assert weight_bytes({"total_params": 1024, "quantization": {"bits": 4, "group_size": 32}}, 2) == 512 + 128
    half = estimate_training_memory({**INFO, "dtype": "bfloat16", "num_heads": 0}, 0, 1, 16, backend="cpu")
    assert half["weights"] == 2000  # 2 bytes a parameter; heads default to hidden / 64
    # A quantized base: dequantized to float32 on the CPU (models.load_model), kept packed on a GPU.
    assert estimate_training_memory(DEMO_INFO, 0, 1, 16, backend="cpu")["weights"] == 134_515_008 * 4
    packed = estimate_training_memory(DEMO_INFO, 0, 1, 16, backend="metal")["weights"]
    assert packed == weight_bytes(DEMO_INFO, 2) < 134_515_008


def test_demo_default_no_longer_warns_with_24_gb(monkeypatch) -> None:
    """The demo as a new user runs it (batch 4, max length 2048, packed; the demo data's rows are at most 62
    tokens): about the 0.95 GB the run peaks at on the CPU (bench/README.md), not 28 GB over the 23.6 available."""
    from lora_app.ui import data_step, engine, estimates

    monkeypatch.setattr(engine, "machine", lambda: ("cpu", int(23.6e9)))
    monkeypatch.setattr(estimates, "default_backend", lambda: "cpu")
    longest = data_step.known_longest_row("demo")
    text = estimates.adapter_summary(DEMO_INFO, "all", QV, 8, 4, 2048, False, longest)
    est = estimate_training_memory(DEMO_INFO, DEMO_TRAINABLE, 4, 2048, longest_row=longest, backend="cpu")
    assert "⚠️" not in text and est["width"] == 64 and 0.95e9 * 0.75 < est["total"] < 0.95e9 * 1.25
    assert f"about {estimates.human_bytes(est['total'])} (weights" in text and "batch 4 × 64 tokens" in text
    assert "longest row has 62 tokens" in text
    before_preview = estimates.adapter_summary(DEMO_INFO, "all", QV, 8, 4, 2048, False, None)
    assert "upper bound" in before_preview and "batch 4 × 2,048 tokens" in before_preview


def test_estimate_follows_the_data_not_max_seq_length() -> None:
    """The widest batch is the bucket of the longest row (its inputs: all tokens but the last), capped at
    max_seq_length; without data, rows of max_seq_length."""
    def est(max_len: int, longest: int | None = None) -> dict:
        return estimate_training_memory(DEMO_INFO, DEMO_TRAINABLE, 4, max_len, longest_row=longest, backend="cpu")

    assert est(2048, 62) == est(64) and est(2048, 62)["width"] == 64
    assert est(2048, 65)["width"] == 64 and est(2048, 66)["width"] == 96
    assert est(2048, 600)["width"] == 768 and est(2048, 100_000)["width"] == 2048 == est(2048)["width"]
    assert est(512, 600)["width"] == 512
    assert est(2048, 62)["activations"] * 20 < est(2048)["activations"]


def test_the_one_change_fits_and_is_tried_in_order() -> None:
    kw = {"longest_row": 2000, "backend": "cpu"}
    full = estimate_training_memory(DEMO_INFO, DEMO_TRAINABLE, 4, 2048, **kw)
    ckpt = estimate_training_memory(DEMO_INFO, DEMO_TRAINABLE, 4, 2048, grad_checkpoint=True, **kw)
    what, new, _ = fitting_change(DEMO_INFO, DEMO_TRAINABLE, 4, 2048, False, ckpt["total"] + 1, **kw)
    assert what == "gradient checkpointing" and new == ckpt and ckpt["total"] < full["total"]
    # Checkpointing already on: the largest batch that fits.
    two, three = (estimate_training_memory(DEMO_INFO, DEMO_TRAINABLE, b, 2048, True, **kw)["total"] for b in (2, 3))
    budget = (two + three) / 2
    what, new, _ = fitting_change(DEMO_INFO, DEMO_TRAINABLE, 4, 2048, True, budget, **kw)
    assert what == "batch size 2" and new["total"] <= budget
    # Not even one row of 2048 fits: the longest bucket that fits the batch of 4.
    budget = estimate_training_memory(DEMO_INFO, DEMO_TRAINABLE, 1, 2048, True, **kw)["total"] - 1
    what, new, _ = fitting_change(DEMO_INFO, DEMO_TRAINABLE, 4, 2048, True, budget, **kw)
    longer = {768: 1024, 1024: 1536, 512: 768, 384: 512}[new["width"]]
    assert what == f"max sequence length {new['width']}" and new["total"] <= budget
    assert estimate_training_memory(DEMO_INFO, DEMO_TRAINABLE, 4, longer, True, **kw)["total"] > budget
    assert fitting_change(DEMO_INFO, DEMO_TRAINABLE, 4, 2048, True, 1e6, **kw) is None  # below the weights
    text = memory_warning(full, ckpt["total"] + 1, "test", change=fitting_change(
        DEMO_INFO, DEMO_TRAINABLE, 4, 2048, False, ckpt["total"] + 1, **kw))
    assert text and f"With gradient checkpointing it would need {memory.parts_text(ckpt)}" in text


def test_fewer_blocks_is_the_last_resort() -> None:
    """A budget that only LoRA on fewer (later) blocks meets: the gradient then stops at the first adapted block."""
    kw = {"longest_row": 64, "backend": "cpu", "blocks_trained": 30}
    smallest = estimate_training_memory(DEMO_INFO, DEMO_TRAINABLE, 1, 32, True, **kw)["total"]
    what, new, _ = fitting_change(DEMO_INFO, DEMO_TRAINABLE, 1, 32, True, smallest - 1, **kw)
    assert what.startswith("LoRA on the last ") and new["total"] <= smallest - 1


def test_verdict() -> None:
    assert verdict(7e9, 10e9) == "fits" and verdict(9e9, 10e9) == "tight" and verdict(11e9, 10e9) == "does not fit"


def test_warning_triggers_only_above_what_is_available() -> None:
    est = estimate_training_memory(INFO, 500, 2, 32)
    assert memory_warning(est, est["total"] + 1, "test") is None
    text = memory_warning(est, est["total"] - 1, "test")
    assert text and "gradient checkpointing" in text and "smaller batch" in text
    limited = memory_warning(est, 10 * est["total"], "test", limit=1000)
    assert limited and "memory_limit_gb" in limited


def test_available_memory_names_its_source() -> None:
    size, source = available_memory()
    assert size > 0 and source


def test_a_cuda_card_is_sized_by_its_own_memory(monkeypatch) -> None:
    """MLX's CUDA backend reports the card's memory as total_memory (an H100's mx.device_info(), MLX 0.32.4): a run
    is checked against it, not against the host's RAM (twice as much on the lent H100 machine)."""
    monkeypatch.setattr(memory, "meminfo_available", lambda: 133 * 10**9)
    h100 = {"device_name": "NVIDIA H100 80GB HBM3", "total_memory": 85_520_809_984, "free_memory": 84_000_000_000}
    assert available_memory(h100) == (85_520_809_984, "mx.device_info()['total_memory']")
    assert available_memory({"architecture": "x86_64"}) == (133 * 10**9, "/proc/meminfo MemAvailable")


def test_an_mlx_that_did_not_start_is_asked_once(monkeypatch) -> None:
    """The memory line and the catalog ask engine.machine() on every change of the form: when MLX's probe fails, its
    subprocess runs once, and the Model step still gets the error's words each time."""
    from lora_app.ui import engine

    probes = []
    real_run = engine.run
    monkeypatch.setattr(engine, "run", lambda cmd, timeout, **kw: probes.append(cmd) or real_run(cmd, timeout, **kw))
    monkeypatch.setattr(engine, "BACKEND_CODE", "import sys; sys.exit('ImportError: libmlx.so: cannot open it')")
    monkeypatch.setattr(memory, "meminfo_available", lambda: 20 * 10**9)
    cached = getattr(engine, "probe_backend", engine.backend)
    cached.cache_clear()
    try:
        assert engine.machine() == engine.machine() == ("cpu", 20 * 10**9)
        for _ in range(2):
            with pytest.raises(engine.EngineError, match="libmlx.so: cannot open it"):
                engine.backend()
        assert len(probes) == 1
    finally:
        cached.cache_clear()


def tiny_config(model: Path, data: Path, **overrides: object) -> RunConfig:
    return RunConfig.from_flat({"model": str(model), "data": str(data), "iters": 2, "batch_size": 2,
                                "max_seq_length": 64, "steps_per_eval": 0, **overrides})


def test_trainer_warns_before_training(tiny_model, text_data, tmp_path) -> None:
    cfg = tiny_config(tiny_model, text_data, memory_limit_gb=1e-6)
    assert trainer.run(tmp_path, cfg).status == "done"
    events = runs.read_events(tmp_path)
    kinds = [e["event"] for e in events]
    assert kinds.index("warning") < kinds.index("train")
    warning = events[kinds.index("warning")]["message"]
    assert "memory_limit_gb" in warning and "may need about" in warning
    assert any("memory estimate" in e.get("message", "") for e in events)


def test_a_real_run_peaks_near_its_estimate(tmp_path) -> None:
    """A small llama (4 blocks, hidden 256, float32) trained 2 steps on the CPU on 100-200-token rows, packed:
    the trainer's own estimate (logged before step 1) against the peak the train events report."""
    import tiny

    model = tiny.build_tiny_model(tmp_path / "model", layers=4, hidden=256)
    data = tmp_path / "data"
    data.mkdir()
    texts = [" ".join(tiny.sentences(10 + i % 10, seed=i)) for i in range(24)]
    tiny.write_jsonl(data / "train.jsonl", [{"text": t} for t in texts])
    cfg = tiny_config(model, data, batch_size=4, max_seq_length=1024, steps_per_report=1)
    (tmp_path / "run").mkdir()
    assert trainer.run(tmp_path / "run", cfg).status == "done"
    events = runs.read_events(tmp_path / "run")
    estimate = next(e["memory_estimate"] for e in events if "memory_estimate" in e)
    peak = max(e["peak_memory_gb"] for e in events if e["event"] == "train") * 1e9
    assert 128 <= estimate["width"] <= 256  # the data's longest row, not max_seq_length
    # Above rather than below: half of these steps pack several sequences a row, which on the CPU attend by spans
    # and keep fewer scores than the estimate's widest batch (one sequence a row) counts.
    assert 0.75 < estimate["total"] / peak < 1.35, (estimate, peak)


@pytest.mark.slow
def test_the_demo_datas_longest_row_is_known() -> None:
    """data_step.DEMO_LONGEST_ROW, which sizes the demo's batches before a preview, is the preview's tokens_max."""
    from lora_app.ui import data_step, engine

    report = engine.preview("demo", "demo", "auto", 0.1, False, False, 2048, 4)
    assert report["statistics"]["tokens_max"] == data_step.DEMO_LONGEST_ROW


OOM_MESSAGES = [
    "[metal::malloc] Attempting to allocate 34359738368 bytes which is greater than the maximum allowed buffer "
    "size of 28991029248 bytes.",
    "[METAL] Command buffer execution failed: Insufficient Memory "
    "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "[malloc] Unable to allocate 1073741824 bytes.",
    "CUDA error: out of memory",
]


@pytest.mark.parametrize("text", OOM_MESSAGES)
def test_out_of_memory_is_described_with_advice(text: str) -> None:
    message = describe_failure(RuntimeError(text))
    assert message.startswith("out of memory") and "smaller batch size" in message
    assert "gradient checkpointing" in message


def test_other_failures_keep_their_text() -> None:
    assert describe_failure(MemoryError()).startswith("out of memory (MemoryError)")
    assert describe_failure(ValueError("shapes differ")) == "ValueError: shapes differ"


def test_oom_during_training_ends_the_run_plainly(tiny_model, text_data, tmp_path, monkeypatch) -> None:
    # MLX on CPU aborts (segfaults) instead of raising on a failed allocation, so raise what Metal raises.
    def train(*args: object) -> None:
        raise RuntimeError(OOM_MESSAGES[0])

    monkeypatch.setattr(trainer, "train", train)
    assert trainer.run(tmp_path, tiny_config(tiny_model, text_data)).status == "error"
    state = runs.run_state(tmp_path)
    assert state.status == "error" and state.message.startswith("out of memory")
    assert "Traceback" not in state.message and "smaller batch size" in state.message


def test_a_16_gb_mac_gets_the_proposal_for_its_gpu_working_set(monkeypatch) -> None:
    """The Training step on a 16 GB Mac: MLX reports an 11.5 GB (10.7 GiB) GPU working set while the system says
    far more is available (unified memory); the 8B QLoRA of bench/qlora_8b.py is measured against the working set,
    as the trainer's own check does, and the line proposes the change that fits it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    from memory_estimate import LLAMA8B

    from lora_app.catalog import info_from_config
    from lora_app.lora import count_for
    from lora_app.ui import engine, estimates

    working_set = 16 * 2**30 * 2 // 3
    monkeypatch.setattr(engine, "backend", lambda: {"backend": "Apple GPU (Metal)", "device": "Device(gpu, 0)",
                                                    "info": {"max_recommended_working_set_size": working_set}})
    monkeypatch.setattr(memory, "meminfo_available", lambda: 64 * 10**9)
    monkeypatch.setattr(estimates, "default_backend", lambda: "metal")
    info = info_from_config(dict(LLAMA8B, quantization={"group_size": 64, "bits": 4}))
    modules = list(info["module_shapes"])
    trainable = count_for(info["module_shapes"], modules, info["num_blocks"], 16)
    text = estimates.adapter_summary(info, "all", modules, 16, 4, 2048, False, 2000)
    change = fitting_change(info, trainable, 4, 2048, False, working_set, backend="metal", modules=modules,
                            longest_row=2000)
    assert change and f"more than the {estimates.human_bytes(working_set)}" in text, text
    assert f"with {change.words} it would be about {estimates.human_bytes(change.estimate['total'])}" in text
