"""`python -m lora_app serve`: a model and its adapters behind an OpenAI-compatible API, kept loaded.

mlx-lm's server does the work: its request handler (`/v1/chat/completions`, `/v1/completions`, streaming), its
generation thread and its prompt cache, so a follow-up turn encodes only the tokens the cache does not hold. This
module decides what it loads and who may ask:
- the base model and every adapter stay loaded at once, the adapters' models sharing the base's weight arrays,
  so base and adapter answers can alternate without a reload; a request picks one by its model id ("base" or the
  adapter's name), never by a path (mlx-lm would load any path or hub repo a request names);
- loading goes through our loader: `demo`, adapter folders of ours, mlx-lm's or PEFT's, de-quantized on a CPU;
- the Host and Origin rules of the app (ui/host_guard.py, against DNS rebinding) and an optional bearer key;
- GET /v1/models lists what is served (mlx-lm 0.32.2 scans the Hugging Face cache and fails when it is missing);
- a chat template for models that have none (TEMPLATES), with its stop strings added to every request.

Imports no gradio; MLX only where a model is loaded (the generation thread).
"""

from __future__ import annotations

import argparse
import copy
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .ui.host_guard import LOOPBACK_NAMES, SAFE_METHODS, HostGuard

BASE = "base"  # the model id of the base model without an adapter
API_KEY_ENV = "LORA_APP_API_KEY"
MAX_BODY = 16 * 2**20  # a chat request is a few KB; a larger body is refused before it is read
MAX_TOKENS = 32_768
PROMPT_CACHE_SIZE = 10  # distinct KV caches kept (mlx-lm's default): a few conversations per model id

# Common chat formats for models that have no template of their own: (name, Jinja template, stop strings).
TEMPLATES = {
    "chatml": ("ChatML",
               "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", ["<|im_end|>"]),
    "llama3": ("Llama-3",
               "{{ bos_token if bos_token else '' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
               "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}", ["<|eot_id|>"]),
    "plain": ("User:/Assistant:",
              "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n{% elif m['role'] == "
              "'user' %}User: {{ m['content'] }}\n{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}Assistant:{% endif %}", ["\nUser:"]),
}
OWN = "own"  # the model's own template (the default); a model without one gets "plain"


class ServeError(ValueError):
    """Bad serve arguments: one line, exit code 2."""


@dataclass
class Served:
    """What one server serves: the base model and adapters by model id, and the chat template in use."""

    model: str  # as given (demo, a folder, a hub id)
    path: str  # resolved
    adapters: dict[str, str] = field(default_factory=dict)  # model id -> adapter folder
    template: str = OWN  # OWN or a TEMPLATES key

    @property
    def ids(self) -> list[str]:
        return [BASE, *self.adapters]

    @property
    def default(self) -> str:
        """A request that names no model (or mlx-lm's "default_model") gets the first adapter, as with
        `mlx_lm.server --adapter-path`; the base model when there is none."""
        return next(iter(self.adapters), BASE)

    @property
    def stop(self) -> list[str]:
        return TEMPLATES[self.template][2] if self.template in TEMPLATES else []


def model_has_chat_template(path: str | Path) -> bool | None:
    """Whether a local model folder ships a chat template (tokenizer_config.json or chat_template.jinja/json);
    None when it is not a local folder (a hub id: known only once loaded)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template")) if isinstance(config, dict) else False


def parse_adapter(spec: str) -> tuple[str, str]:
    """`NAME=FOLDER` or `FOLDER` -> (model id, folder); a run's adapters/ or best/ is named `<run>` / `<run>-best`."""
    name, sep, folder = spec.partition("=")
    if not sep:
        name, folder = "", spec
    path = Path(folder).expanduser()
    if not name:
        name = path.parent.name if path.name == "adapters" else (
            f"{path.parent.name}-best" if path.name == "best" else path.name)
    return name.strip() or "adapter", str(path)


def plan(model: str, adapters: list[str], template: str = OWN) -> Served:
    """Check the arguments before anything loads: the model folder, each adapter folder (read, not loaded), the
    template. ServeError / ModelError / AdapterError say what is wrong in one line."""
    from .adapters import adapter_folder, read_adapter
    from .models import resolve_model

    if template != OWN and template not in TEMPLATES:
        raise ServeError(f"--chat-template {template!r}: choose {OWN}, " + ", ".join(TEMPLATES))
    served = Served(model=model, path=resolve_model(model))
    for spec in adapters:
        name, folder = parse_adapter(spec)
        if name in served.ids:
            raise ServeError(f"--adapter {spec}: the model id {name!r} is taken; name it: --adapter NAME={folder}")
        settings = read_adapter(adapter_folder(folder))
        served.adapters[name] = str(settings.folder)
    if template == OWN and model_has_chat_template(served.path) is False:
        served.template = "plain"
    else:
        served.template = template
    return served


# ---- loading: the base once, each adapter on a copy that shares its weights ------------------------------------

def shared_copy(value: Any) -> Any:
    """A copy of a module tree whose arrays are the original's: applying LoRA to it leaves the original as it is
    and costs no second copy of the weights."""
    import mlx.nn as nn

    if isinstance(value, nn.Module):
        new = copy.copy(value)  # a new dict of the same children and arrays, and a copy of its attributes
        new._no_grad = set(value._no_grad)
        for key, child in value.items():
            new[key] = shared_copy(child)
        return new
    if isinstance(value, (list, tuple)):
        return type(value)(shared_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: shared_copy(v) for k, v in value.items()}
    return value


def load_served(served: Served) -> dict[str, tuple[Any, Any]]:
    """model id -> (model, tokenizer), the adapters' models sharing the base's weights and its tokenizer."""
    from .adapters import load_adapter
    from .models import load_model

    base, tokenizer = load_model(served.path)
    if served.template in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[served.template][1]  # forwarded to the Hugging Face tokenizer
        tokenizer.has_chat_template = True
    models = {BASE: (base, tokenizer)}
    for name, folder in served.adapters.items():
        model = shared_copy(base)
        load_adapter(model, Path(folder))
        model.eval()
        models[name] = (model, tokenizer)
    return models


def provider_for(served: Served, args: argparse.Namespace) -> Any:
    """mlx-lm's ModelProvider, loading with load_served and switching between the loaded models by id."""
    from mlx_lm.server import ModelProvider, make_prompt_cache

    class Provider(ModelProvider):
        def __init__(self) -> None:
            super().__init__(args)
            self.served, self.loaded, self.load_error = served, {}, None

        def load_default(self) -> None:  # in the generation thread, where MLX will run the models
            try:
                self.loaded = load_served(self.served)
            except Exception as e:  # noqa: BLE001 - every request then answers with this line, not a dead thread
                self.load_error = f"could not load {self.served.model}: {type(e).__name__}: {e}"
                logging.error(self.load_error)

        def load(self, model_path: str, adapter_path: str | None = None, draft_model_path: str | None = None):
            if self.load_error:
                raise RuntimeError(self.load_error)
            model, tokenizer = self.loaded[model_path]  # a served id: the handler checked it
            if self.model_key != (model_path,):
                self.model_key, self.model, self.tokenizer = (model_path,), model, tokenizer
                self.is_batchable = all(hasattr(c, "merge") for c in make_prompt_cache(model))
            return model, tokenizer

        def reset(self) -> None:
            super().reset()
            self.loaded = {}

    return Provider()


def server_args(served: Served, max_tokens: int = 512) -> argparse.Namespace:
    """The settings mlx-lm's server reads (its CLI's defaults), for what we serve."""
    return argparse.Namespace(
        model=served.path, adapter_path=None, draft_model=None, num_draft_tokens=3, trust_remote_code=False,
        chat_template="", use_default_chat_template=False, chat_template_args={}, pipeline=False,
        allowed_origins=[],  # no CORS headers: a page of another origin cannot read the answers
        temp=0.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=max_tokens, decode_concurrency=32,
        prompt_concurrency=8, prefill_step_size=2048, prompt_cache_size=PROMPT_CACHE_SIZE, prompt_cache_bytes=None,
        kv_bits=None, kv_group_size=64, quantized_kv_start=0,
    )


# ---- HTTP: mlx-lm's handler behind our checks ------------------------------------------------------------------

def handler_class() -> type:
    from mlx_lm.server import APIHandler

    class Handler(APIHandler):
        """mlx-lm's APIHandler; the server object carries `guard`, `api_key` and `served`."""

        def parse_request(self) -> bool:  # every method passes here first
            if not super().parse_request():
                return False
            refusal = self.refusal()
            if refusal:
                status, text = refusal
                body = (text + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", "Bearer")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True
                return False
            return True

        def refusal(self) -> tuple[int, str] | None:
            guard: HostGuard = self.server.guard
            host = self.headers.get("Host")
            text = guard.host_refusal(host)
            if text is None and self.command not in SAFE_METHODS:
                text = guard.origin_refusal(self.headers.get("Origin"), host or "")
            if text:
                return 403, text
            key = self.server.api_key
            if key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                               f"Bearer {key}".encode()):
                return 401, "refused: this server needs its API key (Authorization: Bearer KEY)"
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if length > MAX_BODY:
                return 413, f"refused: a request body of {length} bytes; at most {MAX_BODY}"
            return None

        def validate_model_parameters(self) -> None:
            """mlx-lm's checks, then: the model is one we serve (by id), no adapter or draft model by path, and
            the template's stop strings added."""
            super().validate_model_parameters()
            served: Served = self.server.served
            name = served.default if self.requested_model in ("default_model", "") else self.requested_model
            if name == served.model:
                name = BASE
            if name not in served.ids:
                raise ValueError(f"model {self.requested_model!r} is not served here; choose one of "
                                 + ", ".join(served.ids))
            if self.adapter is not None:
                raise ValueError("adapters: choose an adapter by its model id (GET /v1/models lists them)")
            if self.max_tokens > MAX_TOKENS:
                raise ValueError(f"max_tokens must be at most {MAX_TOKENS}")
            self.requested_model, self.requested_draft_model = name, None
            if served.stop:
                stop = self.body.get("stop") or []
                self.body["stop"] = [*([stop] if isinstance(stop, str) else stop), *served.stop]

        def handle_models_request(self) -> None:
            served: Served = self.server.served
            models = [{"id": name, "object": "model", "created": self.created, "owned_by": "lora_app",
                       "root": served.model, **({"adapter": served.adapters[name]} if name != BASE else {})}
                      for name in served.ids]
            body = json.dumps({"object": "list", "data": models}).encode()
            self._set_completion_headers(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def make_server(served: Served, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                max_tokens: int = 512) -> tuple[ThreadingHTTPServer, Any]:
    """(HTTP server, mlx-lm's ResponseGenerator): the generation thread starts loading the models now; the
    caller runs `serve_forever()` and, at the end, `shutdown()` and `generator.stop_and_join()`."""
    from mlx_lm.server import LRUPromptCache, ResponseGenerator

    generator = ResponseGenerator(provider_for(served, server_args(served, max_tokens)),
                                  LRUPromptCache(PROMPT_CACHE_SIZE))
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    handler = handler_class()
    try:
        httpd = server_class((host, port), lambda *a: handler(generator, *a))
    except OSError:
        generator.stop_and_join()
        raise
    httpd.guard, httpd.api_key, httpd.served = HostGuard(None, host=host), api_key, served
    return httpd, generator


def url_of(httpd: ThreadingHTTPServer) -> str:
    host, port = httpd.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/v1"


def is_local(host: str) -> bool:
    try:
        return host.strip("[]") in LOOPBACK_NAMES or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    if not is_local(host) and not api_key:
        raise ServeError(f"--host {host} makes the server reachable from other machines; give it a key: "
                         f"--api-key KEY (or ${API_KEY_ENV})")


def main(args: argparse.Namespace) -> int:
    """The serve command: check, load, print the URL (one line on stdout), serve until killed."""
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key)
    if not 0 <= args.port < 65536:
        raise ServeError(f"--port {args.port}: must be between 0 (any free port) and 65535")
    served = plan(args.model, args.adapter or [], args.chat_template)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(message)s")
    try:
        httpd, generator = make_server(served, args.host, args.port, api_key, args.max_tokens)
    except OSError as e:
        raise ServeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if args.with_parent:
        end_with_parent()
    print(f"serving {url_of(httpd)} models: {', '.join(served.ids)} (template: {served.template})", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        generator.stop_and_join()
    return 0


def end_with_parent() -> None:
    """Exit when the process that started this one is gone (the app's chat worker must not outlive a killed app)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="demo, a model folder, or a hub repo id.")
    parser.add_argument("--adapter", action="append", metavar="[NAME=]FOLDER",
                        help="An adapter folder (ours, mlx-lm's or PEFT), served as model id NAME (default: the run's "
                             "name); repeat for several. The base model is model id 'base'.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: this machine only).")
    parser.add_argument("--port", type=int, default=8080, help="Port (default 8080; 0: any free port).")
    parser.add_argument("--api-key", help=f"Require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else "
                                          "none); required with a non-local --host.")
    parser.add_argument("--chat-template", default=OWN, choices=[OWN, *TEMPLATES],
                        help="The model's own (default; 'plain' when it has none), or a common format.")
    parser.add_argument("--max-tokens", type=int, default=512, help="Default answer length when a request names none.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--with-parent", action="store_true", help=argparse.SUPPRESS)  # the app's chat worker
