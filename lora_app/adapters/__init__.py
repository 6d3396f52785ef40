"""Adapter folders: one reader for ours, mlx-lm's and PEFT's, one loader, and export built on them.

    reader.py   any adapter folder -> AdapterSettings (imports neither MLX nor gradio: the page uses it)
    peft.py     PEFT's tensor names, orientation and config <-> mlx-lm's
    loader.py   write our folders; load any folder into a model (load_adapter, init_from_adapter)
    fuse.py     merge an adapter into its base model's weights
    check.py    after a fuse: the written model's logits against base + adapter; check.json
    gguf.py     llama.cpp's converter (fetched, pinned) and the GGUF read back against the fused weights
    modelfile.py  an Ollama Modelfile with the model's chat template in Ollama's form (FROM a GGUF, or ADAPTER)
    ollama_adapter.py  what Ollama's own adapter import takes (gemma2, mixtral): families, tensor names, checks
    export.py   write an MLX (fused), GGUF (or Ollama adapter) or PEFT folder for other tools, checked, never
                overwriting
    lmstudio.py   LM Studio's models folder, and a copy into it
    report.py   what `export` prints: each check's line from check.json
    card.py     a model card (README.md) and loss curve (PNG) from a run
    push.py     upload an adapter or export to the Hugging Face Hub, then compare the listing with the files

Each module imports only the ones above it in this list, and none imports this __init__, so the package has
no import cycle (tests/test_imports.py). The names below are the package's public interface.
"""

from .export import FORMATS, ExportError, check_free, export_adapter, export_peft, new_folder
from .gguf import FAMILIES as GGUF_FAMILIES
from .loader import adapter_config, check_weights, init_from_adapter, load_adapter, read_tensors, save_adapter
from .reader import (
    ADAPTER_FILE,
    CONFIG_FILE,
    PEFT_WEIGHTS,
    AdapterError,
    AdapterSettings,
    adapter_folder,
    base_model_of,
    is_peft_folder,
    read_adapter,
    read_adapter_config,
    read_peft_config,
)

__all__ = [
    "ADAPTER_FILE", "CONFIG_FILE", "FORMATS", "GGUF_FAMILIES", "PEFT_WEIGHTS", "AdapterError", "AdapterSettings",
    "ExportError", "adapter_config", "adapter_folder", "base_model_of", "check_free", "check_weights",
    "export_adapter", "export_peft", "init_from_adapter", "is_peft_folder", "load_adapter", "new_folder",
    "read_adapter", "read_adapter_config", "read_peft_config", "read_tensors", "save_adapter",
]
