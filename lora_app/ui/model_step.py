"""Step 1, Model: a catalog (models on disk, a curated list, any hub repo id) with sizes and a fits verdict at the
form's settings; downloads with a live progress bar; then the chosen model inspected in a subprocess
(architecture, blocks, params, quantization, dtype) plus the MLX backend."""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import gradio as gr

from .. import catalog, hub
from ..config import bound_problem
from ..demo import DEMO_MODEL_NAME, app_home
from ..memory import device_memory
from . import engine, form
from .context import Context, warned
from .downloads import progress_html
from .settings import DEQUANTIZE

PROGRESS_EVERY_S = 0.5


def info_markdown(info: dict) -> str:
    quant = info.get("quantization")
    q = f"{quant['bits']}-bit (group size {quant['group_size']})" if quant else "none"
    return (f"**{info['architecture']}** · {info['num_blocks']} blocks · {info['total_params']:,} parameters · "
            f"hidden size {info['hidden_size']} · vocabulary {info['vocab_size']:,} · dtype {info['dtype']} · "
            f"quantization {q}\n\nLinear modules per block: {', '.join(info['linear_modules'])}\n\n"
            f"`{info['path']}`")


def inspect_model(model: str) -> tuple[dict, str]:
    model = (model or "").strip()
    if not model:
        gr.Warning("Model: empty; choose the demo model, a folder or a Hugging Face repo id.")
        return {}, "⚠️ Model: empty."
    try:
        info = engine.inspect(model)
    except engine.EngineError as e:
        gr.Warning(f"Model {model}: {e}")
        return {}, f"⚠️ Could not inspect `{model}`: {e}"
    return info, info_markdown(info)


def backend_markdown() -> str:
    mem = engine.memory_available_gb()
    mem_text = f"{mem:.1f} GB available" if mem is not None else "unknown"
    try:
        b = engine.backend()
    except engine.EngineError as e:
        return f"⚠️ MLX did not start: {e}"
    limit = device_memory(b["info"])[0]
    extra = f" · device memory {limit / 1e9:.1f} GB" if limit else ""
    return f"**MLX backend** {b['backend']} (`{b['device']}`) · **system memory** {mem_text}{extra}"


# ---- the catalog --------------------------------------------------------------------------------------------

def catalog_entries(ctx: Context, checked: list[dict]) -> list[catalog.Entry]:
    return catalog.entries(ctx.models_dir, hub.cached_models(), app_home() / "models" / DEMO_MODEL_NAME,
                           [catalog.Entry(**c) for c in checked])


def catalog_table(ctx: Context, checked: list[dict], rank: float, modules: list[str], layers: str,
                  batch_size: float, max_seq_length: float, grad_checkpoint: bool,
                  longest_row: int | None = None, method: str = "lora") -> list[list[str]]:
    """The catalog's rows at the form's settings (a bad number in the form: the defaults stand in for it)."""
    backend, available = engine.machine()
    defaults = catalog.Settings()
    numbers = {"rank": rank, "batch_size": batch_size, "max_seq_length": max_seq_length}
    rank, batch_size, max_seq_length = (getattr(defaults, k) if v is None or bound_problem(k, v) else int(v)
                                        for k, v in numbers.items())
    s = catalog.Settings(rank, list(modules or defaults.modules), layers or "all", batch_size, max_seq_length,
                         bool(grad_checkpoint), longest_row or None, backend, method or "lora")
    return catalog.table(catalog_entries(ctx, checked), s, available)


def pick(evt: gr.SelectData) -> tuple:
    """A row picked: a model on disk goes into the Model field; one to download into the repo field."""
    name, where = evt.row_value[0], evt.row_value[1]
    if where in ("built in", "on disk"):
        return gr.update(value=name), gr.skip(), f"`{name}` is ready: Inspect it, or go on to the next steps."
    return gr.skip(), gr.update(value=name), f"`{name}` is not on this machine yet: click **Download**."


def check_repo(repo: str, token: str, checked: list[dict]) -> tuple:
    """Look a repo id up on the hub (size of the files a model needs, license, gate, config) and add it to the
    catalog so its verdict shows before anything is downloaded."""
    repo = (repo or "").strip()
    try:
        summary = hub.remote_summary(repo, token=token or None)
    except hub.HubError as e:
        return gr.skip(), warned(str(e))
    entry = {"name": repo, "where": "hub", "config": summary["config"], "size_bytes": summary["download_bytes"],
             "license": summary.get("license") or "", "gated": bool(summary.get("gated"))}
    return [entry, *[c for c in checked if c["name"] != repo]], f"`{repo}` found on the hub: see its row."


def download(ctx: Context, repo: str, token: str):
    """Start the download and stream its progress bar until it ends; then the model is the chosen one."""
    repo = (repo or "").strip()
    try:
        item = ctx.downloads.start(repo, token)
    except hub.HubError as e:
        yield gr.skip(), warned(str(e)), gr.skip()
        return
    while item.active:
        yield progress_html(item), f"Downloading `{repo}` into the Hugging Face cache…", gr.skip()
        time.sleep(PROGRESS_EVERY_S)
    if item.status == "done":
        yield progress_html(item), f"`{repo}` is downloaded and ready: Inspect it.", gr.update(value=repo)
    elif item.status == "cancelled":
        yield progress_html(item), f"Download of `{repo}` cancelled; no partial files were kept.", gr.skip()
    else:
        yield progress_html(item), warned(f"Download of {repo} failed: {item.message}"), gr.skip()


def cancel(ctx: Context, repo: str) -> str:
    item = ctx.downloads.cancel((repo or "").strip())
    return progress_html(item)


def build(ctx: Context) -> SimpleNamespace:
    gr.Markdown("Choose the base model. The catalog lists the models on this machine, then popular MLX-ready chat "
                "models, with the training memory they need at this page's settings (Adapter and Train steps) "
                "and whether that fits here. Pick a row, or type a folder or a Hugging Face repo id below.")
    table = gr.Dataframe(headers=catalog.COLUMNS, interactive=False, wrap=True, elem_id="model-catalog",
                         label="Models (pick a row)")
    checked = gr.State([])
    with gr.Row():
        repo = gr.Textbox(label="Hugging Face repo id", placeholder="org/name, e.g. mlx-community/Qwen3-0.6B-4bit",
                          elem_id="hub-repo", scale=2)
        token = gr.Textbox(label="Token (gated repos; empty: your saved `hf auth login`)", type="password",
                           elem_id="hub-token", scale=2)
    with gr.Row():
        check = gr.Button("Check on the hub", elem_id="check-repo", scale=0)
        get = gr.Button("Download", variant="primary", elem_id="download-model", scale=0)
        stop = gr.Button("Cancel download", elem_id="cancel-download", scale=0)
    progress = gr.HTML("", elem_id="download-progress")
    message = gr.Markdown("", elem_id="model-message")
    model = form.widget("model", info=None, elem_id="model-path")
    dequantize = gr.Radio(list(DEQUANTIZE), **form.props("dequantize"))
    inspect = gr.Button("Inspect model", variant="primary", elem_id="inspect-model")
    info_md = gr.Markdown("Not inspected yet.", elem_id="model-info")
    backend_md = gr.Markdown("", elem_id="backend-info")

    table.select(pick, None, [model, repo, message], api_name="pick_model")
    check.click(check_repo, [repo, token, checked], [checked, message], api_name="check_repo")
    got = get.click(functools.partial(download, ctx), [repo, token], [progress, message, model],
                    api_name="download_model")
    stop.click(lambda r: cancel(ctx, r), repo, progress, api_name="cancel_download")
    return SimpleNamespace(model=model, dequantize=dequantize, inspect=inspect, info_md=info_md,
                           backend_md=backend_md, table=table, checked=checked, downloaded=got)


def wire(ctx: Context, ui: SimpleNamespace, demo: gr.Blocks, settings: list) -> None:
    """The catalog follows the settings its estimate depends on (rank, modules, layers from the Adapter step;
    batch size, max sequence length, gradient checkpointing from Train; the data's longest row; the method)."""
    rows = lambda checked, *values: catalog_table(ctx, checked, *values)  # noqa: E731
    inputs = [ui.checked, *settings]
    demo.load(rows, inputs, ui.table, api_name="catalog")
    gr.on([ui.checked.change, *(s.change for s in settings)], rows, inputs, ui.table, api_name="catalog_changed",
          show_progress="hidden")
    ui.downloaded.then(rows, inputs, ui.table, api_name="catalog_downloaded", show_progress="hidden")
