"""A work-around in the page for gradio 6.31's status tracker, put into the HTML that serves the page.

Each output's status tracker runs a requestAnimationFrame loop (its elapsed-time counter) while its event is
pending, and stops it only when it sees the status change; one destroyed while pending never stops. The app's own
loading screen is such a tracker, always: it goes away as the page finishes loading, so every open page asks for
a frame 60 times a second for as long as it is open, 57-84 ms of CPU per second on a 2-core machine with nothing
else happening (bench/page_cpu.py), taken from a CPU-only training run. The script below serves the
trackers' frame requests with a 100 ms timer instead: their counter shows tenths of a second anyway, and a leaked
loop then costs ten tiny timer tasks a second and no frames. It has to run before gradio's modules, which keep
their own reference to requestAnimationFrame, so gr.Blocks(head=...), added after loading, is too late.
"""

from __future__ import annotations

# The caller is the first stack frame from gradio's assets (the wrapper itself lives in the page, not there).
SCRIPT = b"""<script>
(() => {
  const frame = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = callback => {
    const caller = (new Error().stack || "").split("\\n").find(line => line.includes("/assets/")) || "";
    return caller.includes("/statustracker")
      ? setTimeout(() => callback(performance.now()), 100) : frame(callback);
  };
})();
</script>"""


class PageScript:
    """ASGI middleware: SCRIPT first in the <head> of the page (GET /, HTML, not compressed); all else untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/":
            return await self.app(scope, receive, send)
        start, body = None, b""

        async def send_page(message):
            nonlocal start, body
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                return await send(message)
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            headers = dict(start["headers"])
            if headers.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in headers \
                    and b"<head>" in body:
                body = body.replace(b"<head>", b"<head>" + SCRIPT, 1)
                start = {**start, "headers": [(k, v) for k, v in start["headers"] if k != b"content-length"]
                         + [(b"content-length", str(len(body)).encode())]}
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_page)
