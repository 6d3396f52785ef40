"""The memory estimate against hand-computed numbers, the warning, and out-of-memory errors as plain advice."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_app import runs, trainer
from lora_app.config import RunConfig
from lora_app.memory import available_memory, estimate_training_memory, memory_warning, weight_bytes
from lora_app.trainer import describe_failure

INFO = {"total_params": 1000, "num_blocks": 2, "hidden_size": 64, "vocab_size": 100, "num_heads": 4,
        "dtype": "float32"}


def test_estimate_components_by_hand() -> None:
    est = estimate_training_memory(INFO, trainable_params=500, batch_size=2, max_seq_length=32)
    per_block = 32 * 2 * 64 * (34 + 5 * 4 * 32 / 64) * 4 / 2  # s·b·h·(34 + 5as/h), scaled to 4-byte floats
    # float32 logits and their gradient (all 64 tokens fit one chunk), and the hidden states' gradient
    logits = 2 * (2 * 32) * 100 * 4 + (2 * 32) * 64 * 4
    assert est["weights"] == 1000 * 4
    assert est["lora_optimizer"] == 500 * 4 * 4  # weights, gradients, Adam m and v
    assert est["activations_full"] == 2 * per_block + logits == 788480
    assert est["activations_checkpointed"] == 2 * (2 * 32 * 64 * 4) + per_block + logits == 460800
    assert est["total"] == 4000 + 8000 + 788480
    ckpt = estimate_training_memory(INFO, 500, 2, 32, grad_checkpoint=True)
    assert ckpt["activations"] == 460800 and ckpt["total"] == 4000 + 8000 + 460800


def test_estimate_counts_one_chunk_of_a_large_vocabulary() -> None:
    """Qwen2's 151,936 words at 8 x 1024 tokens: the loss holds one chunk of logits (and its gradient), not all
    8192 rows (2.5 GB in bfloat16)."""
    from lora_app.head_loss import CHUNK_BYTES

    info = {**INFO, "dtype": "bfloat16"}
    large, small = (estimate_training_memory({**info, "vocab_size": v}, 0, 8, 1024) for v in (151936, 100))
    assert large["activations"] - small["activations"] == 2 * (CHUNK_BYTES - 8 * 1024 * 100 * 2)


def test_quantized_weights_and_defaults() -> None:
    assert weight_bytes({"total_params": 1024, "quantization": {"bits": 4, "group_size": 32}}, 2) == 512 + 128
    half = estimate_training_memory({**INFO, "dtype": "bfloat16", "num_heads": 0}, 0, 1, 16)
    assert half["weights"] == 2000  # 2 bytes a parameter; heads default to hidden / 64


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
