"""Step 6, Save / load: copy an adapter (a run's latest or best, or any mlx-lm or PEFT adapter folder) to a folder
of the user's choice, export it for LM Studio (MLX), Ollama (GGUF) or transformers (PEFT) or push it to the Hugging
Face Hub (each in a subprocess, each checked after writing: the check's lines show under the button), test it, or
load its settings into the form."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .. import hub
from ..adapters.check import read_check
from ..adapters.export import ExportError, check_free
from ..adapters.gguf import setup_problem
from ..adapters.lmstudio import copy_offered, copy_to_lmstudio, models_dir
from ..adapters.ollama_adapter import gguf_format_problem, writes_adapter
from ..adapters.push import REPO_ID
from ..adapters.reader import AdapterError, AdapterSettings, read_adapter
from ..adapters.report import check_lines
from . import engine
from .context import Context, warned
from .runlist import adapter_choices
from .settings import module_choices

KIND_NAMES = {"ours": "adapter", "mlx-lm": "mlx_lm.lora adapter", "peft": "PEFT adapter"}


def adapter_markdown(folder: str | None) -> str:
    if not folder:
        return "Choose an adapter."
    try:
        s = read_adapter(Path(folder).expanduser())
    except AdapterError as e:
        return f"⚠️ {e}"
    step = f" · step {s.step}" if s.step is not None else ""
    val = f" · valid loss {s.val_loss:.4f}" if isinstance(s.val_loss, (int, float)) else ""
    return (f"{KIND_NAMES[s.kind]} · rank {s.rank} · scale {s.scale:g} · dropout {s.dropout:g} · {where(s)} · "
            f"modules {', '.join(s.modules or ['all linear'])}{step}{val}\n\n"
            f"base model `{s.base_model or '?'}`")


def where(s: AdapterSettings) -> str:
    """The adapted blocks in words."""
    if s.layers == "all":
        return "all blocks"
    return f"last {s.layers[5:]} blocks" if s.layers.startswith("last:") else f"blocks {s.layers}"


def save_copy(folder: str | None, dest: str) -> str:
    """Copy the adapter folder; an existing non-empty destination is never overwritten."""
    try:
        read_adapter(Path(folder or "").expanduser())
    except AdapterError as e:
        gr.Warning(f"Save: {e}")
        return f"⚠️ {e}"
    if not str(dest or "").strip():
        return warned("Save: type a destination folder.")
    target = Path(dest.strip()).expanduser()
    try:
        check_free(target)
        shutil.copytree(Path(folder).expanduser(), target, dirs_exist_ok=True)
    except (ExportError, OSError) as e:
        return warned(f"Save: {e}")
    return f"Saved to `{target}`."


FORMATS = [("MLX folder: LM Studio, mlx-lm", "mlx"), ("GGUF + Modelfile: Ollama, llama.cpp", "gguf"),
           ("PEFT adapter: transformers", "peft")]
WEIGHTS = {"as the base model": [], "float": ["--dequantize"], "8-bit": ["--quantize=8"], "4-bit": ["--quantize=4"]}


def gguf_problem(folder: str, weights: str) -> str | None:
    """Why neither a GGUF nor an adapter for Ollama can be made of this adapter, before anything is written (None:
    one can, or the base model's config is not on this machine, which the export itself then reports). An adapter
    for Ollama needs no converter; a GGUF does."""
    quantize = {"8-bit": 8, "4-bit": 4}.get(weights)
    config = base_config(folder)
    problem = gguf_format_problem(config or {"model_type": "llama"}, quantize)
    needs_converter = config is None or not writes_adapter(config)
    return problem or (setup_problem() if needs_converter else None)


def base_config(folder: str) -> dict | None:
    """The config.json of the adapter's base model where it is on this machine (a folder, or a hub repo in the
    cache), else None."""
    try:
        base = read_adapter(Path(folder).expanduser()).base_model
        path = Path(base).expanduser()
        if not path.is_dir() and hub.is_repo_id(base):
            path = hub.cached_model(base) or path
        return json.loads((path / "config.json").read_text())
    except (AdapterError, OSError, ValueError):
        return None


def export_adapter(folder: str | None, fmt: str, out: str, weights: str, ollama_base: str = "") -> tuple[str, dict]:
    """Run `python -m lora_app export`; the result is the folder's check.json as lines (with the ollama command).
    GGUF of a family Ollama imports adapters of: the adapter and a Modelfile, FROM `ollama_base` when given."""
    hidden = gr.update(visible=False)
    if not folder or not (out or "").strip():
        return warned("Export: choose an adapter and type an output folder."), hidden
    target = Path(out.strip()).expanduser()
    try:
        check_free(target)  # here, before a subprocess loads MLX only to refuse it
    except ExportError as e:
        return warned(f"Export {fmt}: {e}"), hidden
    problem = gguf_problem(folder, weights) if fmt == "gguf" else None
    if problem:
        return warned(f"Export gguf: {problem}"), hidden
    flags = WEIGHTS.get(weights, []) if fmt != "peft" else []
    config = base_config(folder)
    if fmt == "gguf" and (ollama_base or "").strip() and (config is None or writes_adapter(config)):
        flags.append(f"--ollama-base={ollama_base.strip()}")  # a whole GGUF needs no base: never sent for one
    try:  # '=': a value that starts with '-' never reads as a flag
        engine.cli("export", f"--adapter={folder}", f"--format={fmt}", f"--out={target}", *flags, timeout=3600)
    except engine.EngineError as e:
        return warned(f"Export {fmt}: {e}"), hidden
    checks = read_check(target) or {}
    made = " as an adapter for Ollama with its Modelfile, not a GGUF" if "ollama_adapter" in checks else ""
    lines = [f"Exported to `{target}`{made}.", *(f"- {line}" for line in check_lines(target))]
    if not checks.get("ok", True):
        gr.Warning(f"Export {fmt}: a check after writing failed; see the lines under the button")
    offer = fmt == "mlx" and copy_offered()
    if fmt == "mlx" and not offer:
        lines.append(f"- LM Studio (macOS) finds MLX models in `{models_dir()}/<publisher>/<model>/`.")
    return "\n".join(lines), gr.update(visible=offer)


def copy_lmstudio(out: str) -> str:
    try:
        return f"Copied to LM Studio: `{copy_to_lmstudio(Path(out.strip()).expanduser())}`."
    except (ExportError, OSError) as e:
        return warned(f"LM Studio: {e}")


def push_adapter(folder: str | None, repo: str, token: str, private: bool, fmt: str) -> str:
    """Run `python -m lora_app push`; the token travels in HF_TOKEN (never on a command line)."""
    repo = (repo or "").strip()
    if not folder or not REPO_ID.match(repo):
        return warned("Push: choose an adapter and type a repo id as ORG/NAME.")
    env = engine.env()
    if (token or "").strip():
        env["HF_TOKEN"] = token.strip()
    cmd = [sys.executable, "-m", "lora_app", "push", f"--adapter={folder}", f"--repo={repo}", f"--format={fmt}"]
    try:
        done = subprocess.run(cmd + ["--private"] * bool(private), capture_output=True, text=True, env=env,
                              cwd=engine.ROOT, timeout=3600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return warned("Push: no answer within an hour")
    if done.returncode not in (0, 1):
        return warned(f"Push: {engine.error_line(done.stderr) or f'exit code {done.returncode}'}")
    summary, *rest = done.stdout.strip().splitlines() or ["?"]
    url = json.loads(rest[0]).get("url", "") if rest else ""
    if done.returncode == 1:
        return warned(f"Push: {summary}")
    return "\n".join([f"Pushed to {url or repo}.", f"- {summary}", *(f"- {line}" for line in rest[1:])])


def settings_from_adapter(folder: str | None, info: dict | None = None) -> tuple:
    """rank, alpha, dropout, modules, layers, model from an adapter folder (ours, mlx_lm.lora's or PEFT's), and
    the folder itself as init_adapter, so the next run continues training the adapter's weights."""
    path = Path(folder or "").expanduser()
    try:
        s = read_adapter(path)
    except AdapterError as e:
        gr.Warning(f"Load settings: {e}")
        return (gr.skip(),) * 7
    available = (info or {}).get("linear_modules")
    modules = module_choices(s.modules, available) if s.modules else sorted(set(available or []))
    if not modules:  # mlx_lm.lora without keys adapts every linear module of a block
        gr.Warning("Load settings: the adapter adapts every linear module; inspect the model (step 1), "
                   "then tick them all in step 2")
    gr.Info(f"Loaded the {KIND_NAMES[s.kind]}'s settings and weights: rank {s.rank}, modules "
            f"{', '.join(modules) or 'all'}; the next run starts from it")
    return (s.rank, float(s.alpha), float(s.dropout), gr.update(value=modules) if modules else gr.skip(),
            s.layers, s.base_model or gr.skip(), str(path))


def build(ctx: Context) -> SimpleNamespace:
    gr.Markdown("Each run keeps its latest adapter (`adapters/`) and, with validation data, the best one (`best/`). "
                "You can also type the path of any adapter folder made by `mlx_lm.lora`.")
    with gr.Row():
        adapter = gr.Dropdown(adapter_choices(ctx.runs_dir), value=None, allow_custom_value=True,
                              label="Adapter", scale=3, elem_id="save-adapter")
        refresh = gr.Button("↻ Refresh", scale=0)
    about = gr.Markdown("Choose an adapter.")
    with gr.Row():
        use = gr.Button("Test it (step 5)")
        load = gr.Button("Continue training it: load its settings and weights into the form", elem_id="load-adapter")
    with gr.Row():
        dest = gr.Textbox(label="Save a copy to folder (same layout)", scale=3)
        save = gr.Button("Save", variant="primary", scale=0)
    with gr.Row():
        fmt = gr.Radio(FORMATS, value="mlx", label="Export as", elem_id="export-format")
        weights = gr.Radio(list(WEIGHTS), value="as the base model", label="Weights (MLX; GGUF: float or 8-bit)",
                           elem_id="export-weights")
    ollama_base = gr.Textbox(label="Ollama base model, for GGUF of gemma2 / mixtral (written as an adapter + "
                                   "Modelfile): the base as Ollama names it, e.g. gemma2:2b; empty: fill in FROM later",
                             elem_id="export-ollama-base")
    with gr.Row():
        out = gr.Textbox(label="Export to folder", scale=3, elem_id="export-out")
        export = gr.Button("Export", scale=0, elem_id="export")
    export_md = gr.Markdown("", elem_id="export-check")
    lmstudio = gr.Button("Copy into LM Studio's models folder", visible=False, elem_id="copy-lmstudio")
    with gr.Accordion("Push to the Hugging Face Hub", open=False):
        with gr.Row():
            repo = gr.Textbox(label="Repo (ORG/NAME)", scale=2, elem_id="push-repo")
            token = gr.Textbox(label="Token (or HF_TOKEN / `hf auth login`)", type="password", scale=2)
            private = gr.Checkbox(True, label="Private")
        with gr.Row():
            push_fmt = gr.Radio(["adapter", "peft", "fused"], value="adapter", label="Upload")
            push = gr.Button("Push", scale=0)
        push_md = gr.Markdown("", elem_id="push-check")
    status = gr.Markdown("", elem_id="save-status")
    adapter.change(adapter_markdown, adapter, about, api_name="adapter_info")
    refresh.click(lambda: gr.update(choices=adapter_choices(ctx.runs_dir)), None, adapter,
                  api_name="refresh_adapters")
    save.click(save_copy, [adapter, dest], status, api_name="save_adapter")
    export.click(export_adapter, [adapter, fmt, out, weights, ollama_base], [export_md, lmstudio],
                 api_name="export_adapter")
    lmstudio.click(copy_lmstudio, out, export_md, api_name="copy_lmstudio")
    push.click(push_adapter, [adapter, repo, token, private, push_fmt], push_md, api_name="push_adapter")
    return SimpleNamespace(adapter=adapter, use=use, load=load, refresh=refresh)

