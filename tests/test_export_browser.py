"""The Save / load step's export in a real browser (tests/browser.py): the check made after writing (the fused
model's logits against base + adapter) shows under the Export button; a GGUF that cannot be made says so before
anything is written; GGUF of a gemma2 adapter says it was written as an adapter for Ollama, FROM the base typed in."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import launch
from test_export import random_adapter
from test_ollama_adapter import MODULES, tiny_gemma2
from test_ui_client import running_app


@pytest.mark.slow
def test_export_shows_its_check(tiny_model: Path, tmp_path: Path, engine_env: dict) -> None:
    adapter = random_adapter(tiny_model, tmp_path / "adapter", "all", ["q_proj", "v_proj"])
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with running_app(runs_dir, engine_env) as url, launch() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_role("tab", name="6 · Save / load").click()
        box = page.locator("#save-adapter input").first
        box.fill(str(adapter))
        box.press("Enter")
        page.get_by_text("rank 4 · scale 3").wait_for(timeout=30_000)

        page.locator("#export-format").get_by_label("GGUF + Modelfile: Ollama, llama.cpp").check()
        page.locator("#export-weights").get_by_label("4-bit").check()
        page.locator("#export-out textarea").fill(str(tmp_path / "gguf"))
        page.locator("#export").click()
        page.locator("#export-check").get_by_text("llama-quantize").wait_for(timeout=30_000)
        assert not (tmp_path / "gguf").exists()

        page.locator("#export-format").get_by_label("MLX folder: LM Studio, mlx-lm").check()
        page.locator("#export-weights").get_by_label("as the base model").check()
        page.locator("#export-out textarea").fill(str(tmp_path / "fused"))
        page.locator("#export").click()
        shown = page.locator("#export-check")
        shown.get_by_text("fused vs base + adapter (float32)").wait_for(timeout=120_000)
        text = shown.inner_text()
        assert f"Exported to {tmp_path / 'fused'}." in text and "greedy tokens agree 100%: OK" in text
        assert ".lmstudio/models" in text
        assert (tmp_path / "fused" / "check.json").is_file()

        gemma = random_adapter(tiny_gemma2(tmp_path / "gemma2"), tmp_path / "gemma2-adapter", "all", MODULES)
        box.fill(str(gemma))
        box.press("Enter")
        page.get_by_text("modules mlp.down_proj").wait_for(timeout=30_000)
        page.locator("#export-format").get_by_label("GGUF + Modelfile: Ollama, llama.cpp").check()
        page.locator("#export-ollama-base textarea").fill("gemma2:2b")
        page.locator("#export-out textarea").fill(str(tmp_path / "ollama"))
        page.locator("#export").click()
        shown.get_by_text("as an adapter for Ollama with its Modelfile, not a GGUF").wait_for(timeout=120_000)
        assert "No GGUF for gemma2" in shown.inner_text() and "ollama create ollama -f" in shown.inner_text()
        assert "FROM gemma2:2b\nADAPTER ./ollama-adapter\n" in (tmp_path / "ollama" / "Modelfile").read_text()
