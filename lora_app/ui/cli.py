"""`python app.py`: arguments, the safety rules for exposing the page, and launch."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description="The LoRA studio in your browser.")
    p.add_argument("--host", default="127.0.0.1", help="Address to serve on (default: this machine only).")
    p.add_argument("--port", type=int, default=None, help="Port (default: the first free one from 7860).")
    p.add_argument("--auth", help="user:password, required with --share or a non-local --host.")
    p.add_argument("--share", action="store_true", help="Also serve through a public gradio.live link.")
    p.add_argument("--runs-dir", default="runs", help="Folder of run folders (default: runs).")
    p.add_argument("--models-dir", help="A folder of model folders to list in the Model step.")
    p.add_argument("--no-browser", action="store_true", help="Do not open the browser.")
    return p.parse_args(argv)


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(args: argparse.Namespace) -> tuple[str, str] | None:
    """The (user, password) pair; SystemExit with a clear message when exposing the page without it."""
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise SystemExit("error: --auth must be user:password (both non-empty)")
        auth = (user, password)
    exposed = args.share or not is_local(args.host)
    if exposed and auth is None:
        what = "--share" if args.share else f"--host {args.host}"
        raise SystemExit(f"error: {what} makes the page reachable from other machines; "
                         "add --auth user:password to protect it")
    if args.port is not None and not 0 < args.port < 65536:
        raise SystemExit(f"error: --port {args.port}: must be between 1 and 65535")
    return auth


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    auth = check_exposure(args)
    if args.models_dir and not Path(args.models_dir).expanduser().is_dir():
        print(f"warning: --models-dir {args.models_dir}: not a folder; ignoring it", file=sys.stderr)
        args.models_dir = None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from starlette.middleware import Middleware

    from .blocks import CSS_PATH, build_app
    from .host_guard import HostGuard, LoginLimit
    from .page_script import PageScript

    demo = build_app(args.runs_dir, args.models_dir)
    demo.queue(default_concurrency_limit=4)
    calm_queue(demo)
    # Outermost first: a refused request reaches nothing else. host_guard.py gives the rule.
    middleware = [Middleware(HostGuard, host=args.host, share_url=lambda: demo.share_url),
                  *([Middleware(LoginLimit)] if auth else []), Middleware(PageScript)]  # page_script.py says why
    demo.launch(
        server_name=args.host, server_port=args.port, auth=auth, share=args.share,
        inbrowser=not args.no_browser, theme=gr.themes.Soft(), css_paths=[CSS_PATH] if CSS_PATH.exists() else None,
        footer_links=["api"], app_kwargs={"middleware": middleware},
    )


def calm_queue(demo) -> None:
    """Gradio's queue loop polls for work every 1 ms off Windows (every 50 ms on Windows): ~45 ms of CPU per second
    with nobody using the page, taken from a training run on a CPU-only machine (bench/ui_overhead.py). Its
    Windows pacing costs at most 50 ms of latency per click, which nobody sees."""
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, 0.05)
        queue.progress_update_sleep_when_free = max(getattr(queue, "progress_update_sleep_when_free", 0), 0.1)
