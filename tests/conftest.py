"""Shared fixtures: tiny offline models and datasets (see tests/tiny.py), built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# torch and peft, which only tests use, live apart from the app's packages (requirements-reference.txt says why):
# on this process's path, not on the engine processes' it starts.
REFERENCE = Path(sys.prefix) / "reference"
if REFERENCE.is_dir():
    sys.path.append(str(REFERENCE))

import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def mlx_memory_limit_restored():
    """A run trained in-process (trainer.run) sets MLX's process-wide memory limit (memory_limit_gb, the run-ahead
    bound): put it back after each test, or a test's tiny limit would make later tests wait on every allocation."""
    import mlx.core as mx

    limit = mx.get_memory_limit()
    yield
    mx.set_memory_limit(limit)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_qmodel(tmp_path_factory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny-qmodel"), hidden=64, quantize=True)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model) -> Path:
    return tiny.build_tiny_adapter(tmp_path_factory.mktemp("tiny-adapter") / "adapters", tiny_model)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    return tiny.build_text_data(tmp_path_factory.mktemp("text-data"))


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    return tiny.build_chat_data(tmp_path_factory.mktemp("chat-data"))


@pytest.fixture(scope="session")
def engine_env() -> dict[str, str]:
    """Environment for subprocesses that run our CLI or mlx-lm's (OpenBLAS preloaded where present)."""
    from lora_app.runs import engine_env as env

    e = env()
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return e
