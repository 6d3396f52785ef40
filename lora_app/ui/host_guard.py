"""Two ASGI middlewares in front of Gradio: HostGuard (DNS rebinding, cross-site requests) and LoginLimit (a
brute-force limit on the --auth login form).

Gradio 6.31 has no check of its own: its CustomCORSMiddleware only decides which CORS headers to answer with, and
it treats any Host that is not a localhost name as "not local", so a rebound page is even let read the answers.
Starlette's TrustedHostMiddleware cannot take a name learnt after launch (the share link) and misreads an IPv6
Host ("[::1]:7860"), hence our own.

The rule (README, "Set up and run"):
- Host: its name must be 127.0.0.1, localhost, ::1, the --host the app was started on, or (with --share) the name
  of the share link. Any port: the port does nothing against rebinding (the attacker's page uses ours), and a
  tunnel such as `ssh -L 8000:127.0.0.1:7860` rightly arrives as "localhost:8000".
- --host 0.0.0.0 or ::: any Host. The page is then meant to be reached by this machine's LAN names and addresses,
  which cannot be listed reliably; --auth is required there (cli.check_exposure), so a rebound page meets only the
  login form that every machine on the network already sees, and LoginLimit.
- --share: gradio.live's tunnel (frp, run without a Host rewrite) passes the browser's Host on unchanged, so
  requests arrive with the share link's name; it is allowed once Gradio knows the link, and --auth guards it.
- Origin, on anything but GET/HEAD/OPTIONS (and on a WebSocket handshake): when present it must be the origin the
  request is addressed to (name and port equal to the Host's), i.e. a page this app served; a cross-site form POST
  or fetch carries its own origin and is refused. "null" (a sandboxed or file: page) is refused too.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def split_netloc(value: str) -> tuple[str, int | None] | None:
    """(name, port) of a Host header or an origin's host[:port], lower case; None when it is not just that."""
    try:
        parts = urlsplit("//" + value)
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.username is not None or parts.password is not None or parts.path or parts.query \
            or parts.fragment:
        return None
    return name.rstrip("."), port


def origin_netloc(origin: str) -> tuple[str, int | None] | None:
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
        return None
    return split_netloc(parts.netloc)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def refuse(scope: Scope, send: Send, status: int, text: str,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """A one-line plain-text answer; a WebSocket handshake is closed instead (the server answers it with 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": text[:120]})
        return
    body = (text + "\n").encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"x-content-type-options", b"nosniff"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HostGuard:
    """Refuses (403) a request whose Host is not one of the app's names, or whose Origin is not its Host's."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1",
                 share_url: Callable[[], str | None] = lambda: None) -> None:
        self.app = app
        name = host.strip("[]").lower()
        self.any_host = name in WILDCARD_HOSTS
        self.names = {*LOOPBACK_NAMES, name}
        self.share_url = share_url  # read per request: the link exists only after launch

    def allowed_names(self) -> set[str]:
        share = urlsplit(self.share_url() or "").hostname
        return self.names | {share} if share else self.names

    def host_refusal(self, host: str | None) -> str | None:
        where = split_netloc(host) if host else None
        if where is None:
            return f"refused: Host header {host!r} is missing or malformed"
        if self.any_host or where[0] in self.allowed_names():
            return None
        names = ", ".join(sorted(self.allowed_names()))
        return (f"refused: Host {host!r} is not a name this app serves on ({names}); "
                "a page reached through another name may be a DNS-rebinding attack")

    @staticmethod
    def origin_refusal(origin: str | None, host: str) -> str | None:
        if origin is None or origin_netloc(origin) == split_netloc(host):
            return None
        return f"refused: a request from the page at {origin!r} to {host!r}; only this app's own page may send it"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = header(scope, b"host")
        refusal = self.host_refusal(host)
        if refusal is None and (scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS):
            refusal = self.origin_refusal(header(scope, b"origin"), host or "")
        if refusal is not None:
            return await refuse(scope, send, 403, refusal)
        await self.app(scope, receive, send)


class LoginLimit:
    """After `max_failures` failed logins in a row from one client address, refuses (429) its next attempts for
    `base_delay` seconds, doubling with each further failure up to `max_delay`; a successful login clears it.

    An attempt counts as failed when it starts and is cleared when it succeeds, so parallel guesses cannot slip
    past the count. At most `max_clients` addresses are remembered (least recently seen forgotten first).
    Through --share every request comes from the local tunnel, so a guesser there locks the link's real users
    out too: a wait for them, where the alternative is a guessed password."""

    def __init__(self, app: ASGIApp, max_failures: int = 5, base_delay: float = 1.0, max_delay: float = 300.0,
                 max_clients: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.max_failures, self.base_delay, self.max_delay = max_failures, base_delay, max_delay
        self.max_clients, self.clock = max_clients, clock
        self.clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # address -> (failures, locked until)

    def wait_left(self, client: str) -> float:
        _, until = self.clients.get(client, (0, 0.0))
        return until - self.clock()

    def count_attempt(self, client: str) -> None:
        failures = self.clients.pop(client, (0, 0.0))[0] + 1
        over = failures - self.max_failures
        until = self.clock() + min(self.max_delay, self.base_delay * 2 ** over) if over >= 0 else 0.0
        self.clients[client] = (failures, until)
        while len(self.clients) > self.max_clients:
            self.clients.popitem(last=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != "/login":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?",))[0]
        wait = self.wait_left(client)
        if wait > 0:
            seconds = str(math.ceil(wait))
            return await refuse(scope, send, 429, f"refused: too many failed logins from {client}; "
                                f"try again in {seconds} s", [(b"retry-after", seconds.encode())])
        self.count_attempt(client)

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                self.clients.pop(client, None)
            await send(message)

        await self.app(scope, receive, watch)
