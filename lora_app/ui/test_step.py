"""Step 5, Test: a chat with the base model and the adapter side by side, the same turns and sampling settings for
both, streamed from one model worker that stays loaded between messages (chat_worker.py). The same server runs on
its own for other tools: `python -m lora_app serve` (the snippets at the bottom)."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .. import runs
from ..config import DEMO
from ..serve import BASE, OWN, TEMPLATES, model_has_chat_template, parse_adapter
from .chat_worker import ADAPTER_ID, WORKERS, WorkerError, WorkerKey, training_reason
from .context import Context
from .runlist import adapter_choices

TEMPLATE_CHOICES = [("the model's own", OWN)] + [(label, name) for name, (label, _, _) in TEMPLATES.items()]
NO_ADAPTER = "(no adapter chosen: pick one above to compare)"
MAX_TOKENS = 4096
UPDATE_S = 0.1  # at most ~10 redraws of the chat a second while an answer streams


# ---- handlers ------------------------------------------------------------------------------------------

def text_of(content: object) -> str:
    """A chat message's text: gradio gives it back as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content or "")


def conversation(system: str, chat: list[dict]) -> list[dict]:
    """What the worker gets: the system prompt, then the column's turns (its own answers as shown, a stopped one as
    far as it got; failed and skipped ones left out)."""
    messages = [{"role": "system", "content": system.strip()}] if (system or "").strip() else []
    for m in chat:
        text = text_of(m.get("content"))
        if m.get("role") in ("user", "assistant") and not text.startswith(("⚠️", "⏹")):
            messages.append({"role": m["role"], "content": text.removesuffix(" ⏹")})
    return messages


def sampling(temperature: float | None, top_p: float | None, max_tokens: float | None, seed: float | None) -> dict:
    """The request's sampling settings, bounded (an empty box: the default); the same seed for both columns makes
    their draws comparable."""
    def number(value: float | None, default: float, low: float, high: float) -> float:
        return min(max(float(default if value is None else value), low), high)

    return {"temperature": number(temperature, 0.0, 0.0, 2.0), "top_p": number(top_p, 1.0, 0.01, 1.0),
            "max_tokens": int(number(max_tokens, 256, 1, MAX_TOKENS)), "seed": int(number(seed, 0, 0, 2**31 - 1))}


def send(ctx: Context, model: str, adapter: str | None, template: str, system: str, temperature: float,
         top_p: float, max_tokens: float, seed: float, message: str, base_chat: list | None,
         tuned_chat: list | None) -> Iterator[tuple]:
    """One turn: the message to the base model, then to the adapter; yields (base chat, adapter chat, message box,
    status) as the answers stream."""
    model, adapter, message = (model or "").strip(), (adapter or "").strip(), (message or "").strip()
    base_chat, tuned_chat = list(base_chat or []), list(tuned_chat or [])
    if not model or not message:
        gr.Warning("Test: choose a model and type a message.")
        yield gr.skip(), gr.skip(), gr.skip(), "⚠️ choose a model and type a message"
        return
    active = runs.active_run(ctx.runs_dir)
    if active:
        WORKERS.release(training_reason(active.name))
        yield gr.skip(), gr.skip(), gr.skip(), (f"⏸ The chat is paused while training run **{active.name}** runs "
                                                "(training needs the memory and the cores). Send again when it ends.")
        return
    key = WorkerKey(model, adapter, template or OWN)
    settings = sampling(temperature, top_p, max_tokens, seed)
    turn_started = time.monotonic()
    columns = [(BASE, base_chat)] + ([(ADAPTER_ID, tuned_chat)] if adapter else [])
    for _, chat in columns:
        chat.append({"role": "user", "content": message})
    stats = {}
    yield base_chat, tuned_chat, "", status_line(stats, starting=WORKERS.worker is None)
    failed = ""
    for model_id, chat in columns:
        messages = conversation(system, chat)
        chat.append({"role": "assistant", "content": ""})
        if WORKERS.interrupted_at > turn_started or failed:  # Stop, or no worker, while the other column answered
            chat[-1]["content"] = f"⚠️ {failed}" if failed else "⏹ stopped"
            continue
        shown = 0.0
        try:
            for reply in WORKERS.chat(key, model_id, messages, settings):
                chat[-1]["content"] = reply.text + (" ⏹" if reply.stopped else "")
                stats[model_id] = reply.stats()
                if time.monotonic() - shown > UPDATE_S:  # a small model streams faster than a page can redraw
                    shown = time.monotonic()
                    yield base_chat, tuned_chat, gr.skip(), status_line(stats)
        except WorkerError as e:
            failed = str(e)
            chat[-1]["content"] = f"⚠️ {failed}"
            gr.Warning(f"Test: {failed}")
            stats[model_id] = f"error: {failed}"
    yield base_chat, tuned_chat, gr.skip(), status_line(stats)  # the whole turn as it ended


def status_line(stats: dict, starting: bool = False) -> str:
    if starting and not stats:
        return "Starting the model worker and loading the model (once; later messages reuse it)…"
    names = {BASE: "Base", ADAPTER_ID: "Adapter"}
    return "  \n".join(f"**{names[k]}**: {v}" for k, v in stats.items()) + "  \n" + WORKERS.status()


def stop() -> None:
    """End the answers streaming now; the turn's handler then shows them as stopped."""
    WORKERS.interrupt()


def clear() -> tuple:
    return [], [], ""


def worker_status() -> str:
    return WORKERS.status()


def model_changed(model: str) -> tuple[str, str]:
    """A new model ends the worker of the old one (its memory is freed now, not at the next message)."""
    WORKERS.release_unless((model or "").strip())
    return template_notice(model), WORKERS.status()


def local_folder(model: str) -> Path | None:
    """The model's folder when it is on this machine (without building the demo model)."""
    if model == DEMO:
        from ..demo import DEMO_MODEL_NAME, app_home

        return app_home() / "models" / DEMO_MODEL_NAME
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def template_notice(model: str) -> str:
    folder = local_folder((model or "").strip())
    if folder is None or not folder.is_dir():
        return ""
    if model_has_chat_template(folder) is False:
        return ("⚠️ **This model has no chat template** (a base model?). With *the model's own* the chat uses the "
                "plain `User: … / Assistant:` format; pick ChatML or Llama-3 if the model (or your adapter's "
                "training data) used one of those.")
    return "The model's own chat template is applied (pick another only to try a different format)."


def snippets(model: str, adapter: str | None) -> tuple[str, str]:
    """A shell snippet (serve + curl) and a Python one (openai) for the model and adapter chosen."""
    model, adapter = (model or DEMO).strip(), (adapter or "").strip()
    model_id = parse_adapter(adapter)[0] if adapter else BASE
    serve = f"python -m lora_app serve --model {shlex.quote(model)}"
    serve += f" --adapter {shlex.quote(adapter)}" if adapter else ""
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello!"}], "stream": True})
    shell = (f"# Serve it (kept loaded; http://127.0.0.1:8080/v1, this machine only; Ctrl-C ends it):\n"
             f"{serve} --port 8080\n\n# From another terminal:\ncurl -N http://127.0.0.1:8080/v1/models\n"
             f"curl -N http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n"
             f"  -d {shlex.quote(body)}\n")
    python = ("from openai import OpenAI\n\n"
              'client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")  # serve --api-key KEY: the key\n'
              f"stream = client.chat.completions.create(\n    model={model_id!r},  # {BASE!r}: without the adapter\n"
              '    messages=[{"role": "user", "content": "Hello!"}],\n    stream=True,\n)\n'
              'for chunk in stream:\n    print(chunk.choices[0].delta.content or "", end="", flush=True)\n')
    return shell, python


# ---- layout --------------------------------------------------------------------------------------------

def build(ctx: Context) -> SimpleNamespace:
    WORKERS.busy = lambda: (active.name if (active := runs.active_run(ctx.runs_dir)) else None)
    gr.Markdown("Chat with the base model and the adapter side by side: the same turns and sampling settings for "
                "both. The model stays loaded between messages in a worker process of its own.")
    with gr.Row():
        model = gr.Textbox(DEMO, label="Base model", scale=2, elem_id="test-model")
        adapter = gr.Dropdown(adapter_choices(ctx.runs_dir), value=None, allow_custom_value=True,
                              label="Adapter (each run's latest and best, or any folder)", scale=2,
                              elem_id="test-adapter")
        refresh = gr.Button("↻", scale=0)
    with gr.Accordion("System prompt, sampling and chat template", open=False):
        system = gr.Textbox("", label="System prompt", lines=2, elem_id="system-prompt")
        with gr.Row():
            temperature = gr.Slider(0, 2, 0, step=0.05, label="Temperature (0: greedy)", elem_id="temperature")
            top_p = gr.Slider(0.01, 1, 1, step=0.01, label="Top-p")
            max_tokens = gr.Number(256, precision=0, minimum=1, maximum=MAX_TOKENS, label="Max tokens",
                                   elem_id="max-tokens")
            seed = gr.Number(0, precision=0, minimum=0, label="Seed")
        template = gr.Dropdown(TEMPLATE_CHOICES, value=OWN, label="Chat template", elem_id="chat-template")
        notice = gr.Markdown(template_notice(DEMO), elem_id="template-notice")
    with gr.Row():
        base = gr.Chatbot(label="Base model", height=420, buttons=["copy", "copy_all"], elem_id="chat-base")
        tuned = gr.Chatbot(label="With adapter", height=420, buttons=["copy", "copy_all"], elem_id="chat-adapter",
                           placeholder=NO_ADAPTER)
    message = gr.Textbox(label="Message", lines=1, max_lines=8, placeholder="Type a message; Enter sends",
                         elem_id="chat-message")
    with gr.Row():
        go = gr.Button("Send", variant="primary", elem_id="chat-send")
        halt = gr.Button("Stop", elem_id="chat-stop")
        wipe = gr.Button("Clear", elem_id="chat-clear")
    status = gr.Markdown(WORKERS.status(), elem_id="chat-status")
    with gr.Accordion("Use it from other tools (OpenAI-compatible API)", open=False):
        shell, python = snippets(DEMO, None)
        shell_code = gr.Code(shell, language="shell", label="Terminal", interactive=False)
        python_code = gr.Code(python, language="python", label="Python (pip install openai)", interactive=False)

    inputs = [model, adapter, template, system, temperature, top_p, max_tokens, seed, message, base, tuned]
    gr.on([go.click, message.submit], partial(send, ctx), inputs, [base, tuned, message, status],
          api_name="chat", concurrency_limit=1)
    halt.click(stop, None, None, api_name="chat_stop")
    wipe.click(clear, None, [base, tuned, status], api_name="chat_clear")
    model.change(model_changed, model, [notice, status], api_name="test_model_changed", show_progress="hidden")
    gr.on([model.change, adapter.change], snippets, [model, adapter], [shell_code, python_code],
          show_progress="hidden")
    return SimpleNamespace(model=model, adapter=adapter, refresh=refresh, status=status)
