"""The page refuses other names (DNS rebinding), other sites' requests (CSRF) and login guessing (--auth)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from test_ui_client import ROOT, free_port, running_app

EVIL = "evil.example"


async def echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def login(request: Request) -> PlainTextResponse:
    form = await request.form()
    return PlainTextResponse("in" if form.get("password") == "right" else "wrong",
                             status_code=200 if form.get("password") == "right" else 400)


def bare_app() -> Starlette:
    return Starlette(routes=[Route("/", echo, methods=["GET", "POST"]), Route("/login", login, methods=["POST"])])


def guarded(**kwargs) -> TestClient:
    from lora_app.ui.host_guard import HostGuard

    return TestClient(HostGuard(bare_app(), **kwargs), base_url="http://127.0.0.1:7860")


def refused(response, status: int = 403) -> bool:
    lines = response.text.splitlines()
    return response.status_code == status and len(lines) == 1 and lines[0].startswith("refused: ")


def test_guard_accepts_only_the_app_names():
    client = guarded()
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "localhost:8000", "LOCALHOST", "127.0.0.1"):
        assert client.get("/", headers={"host": host}).text == "ok", host
    for host in (f"{EVIL}:7860", EVIL, "127.0.0.1.evil.example", "[::2]:7860", "127.0.0.1:7860/x",
                 "me@127.0.0.1:7860", "127.0.0.1:port", ""):
        answer = client.get("/", headers={"host": host})
        assert refused(answer), (host, answer.status_code, answer.text)
    assert "DNS-rebinding" in client.post("/", headers={"host": EVIL}).text


def test_guard_host_argument_wildcard_and_share_link():
    lan = guarded(host="192.168.1.5")
    assert lan.get("/", headers={"host": "192.168.1.5:7860"}).text == "ok"
    assert lan.get("/", headers={"host": "localhost:7860"}).text == "ok"
    assert refused(lan.get("/", headers={"host": "192.168.1.6:7860"}))
    assert guarded(host="[::1]").get("/", headers={"host": "[::1]:7860"}).text == "ok"

    anywhere = guarded(host="0.0.0.0")  # LAN names cannot be listed; --auth guards it
    assert anywhere.get("/", headers={"host": "mybox.local:7860"}).text == "ok"
    assert anywhere.post("/", headers={"host": "mybox.local:7860", "origin": "http://mybox.local:7860"}).text == "ok"
    assert refused(anywhere.post("/", headers={"host": "mybox.local:7860", "origin": f"http://{EVIL}"}))

    link: list[str | None] = [None]  # the share link exists only once Gradio has opened the tunnel
    shared = guarded(share_url=lambda: link[0])
    assert refused(shared.get("/", headers={"host": "abc123.gradio.live"}))
    link[0] = "https://abc123.gradio.live"
    assert shared.get("/", headers={"host": "abc123.gradio.live"}).text == "ok"
    assert shared.post("/", headers={"host": "abc123.gradio.live", "origin": "https://abc123.gradio.live"}).text \
        == "ok"
    assert refused(shared.get("/", headers={"host": "other.gradio.live"}))


def test_guard_checks_origin_of_state_changing_requests():
    client = guarded()
    own = {"host": "127.0.0.1:7860"}
    assert client.post("/", headers=own).text == "ok"
    assert client.post("/", headers={**own, "origin": "http://127.0.0.1:7860"}).text == "ok"
    assert client.get("/", headers={**own, "origin": f"http://{EVIL}"}).text == "ok"  # a read changes nothing
    for origin in (f"http://{EVIL}", f"http://{EVIL}:7860", "http://127.0.0.1:8000", "http://localhost:7860",
                   "null", "file://", "http://127.0.0.1:7860/page"):
        answer = client.post("/", headers={**own, "origin": origin})
        assert refused(answer), (origin, answer.status_code, answer.text)
    assert refused(client.delete("/", headers={**own, "origin": f"http://{EVIL}"}))


def limited(clock: list[float], address: str = "10.0.0.1", **kwargs) -> TestClient:
    from lora_app.ui.host_guard import LoginLimit

    app = LoginLimit(bare_app(), clock=lambda: clock[0], **kwargs)
    return TestClient(app, base_url="http://127.0.0.1:7860", client=(address, 5000))


def log_in(client: TestClient, password: str) -> int:
    return client.post("/login", data={"username": "u", "password": password}).status_code


def test_login_limit_locks_out_with_growing_delay():
    clock = [0.0]
    client = limited(clock, max_failures=3, base_delay=10, max_delay=25)
    assert [log_in(client, "guess") for _ in range(3)] == [400, 400, 400]
    answer = client.post("/login", data={"username": "u", "password": "right"})
    assert refused(answer, 429) and answer.headers["retry-after"] == "10"
    clock[0] = 10.5
    assert log_in(client, "guess") == 400  # one more try after the wait, then twice as long a wait
    clock[0] = 30
    assert log_in(client, "right") == 429
    clock[0] = 31
    assert log_in(client, "right") == 200
    assert [log_in(client, "guess") for _ in range(3)] == [400, 400, 400]  # a success starts the count afresh
    assert log_in(client, "right") == 429
    clock[0] = 41
    for _ in range(3):  # the wait grows no further than max_delay
        assert log_in(client, "guess") == 400 and log_in(client, "guess") == 429
        clock[0] += 25
    assert client.post("/", data={}).text == "ok"  # other routes are not counted


def test_login_limit_is_per_address_and_bounded():
    from lora_app.ui.host_guard import LoginLimit

    clock = [0.0]
    limit = LoginLimit(bare_app(), max_failures=1, base_delay=60, max_clients=2, clock=lambda: clock[0])
    clients = [TestClient(limit, client=(f"10.0.0.{i}", 5000)) for i in range(3)]
    assert log_in(clients[0], "guess") == 400 and log_in(clients[0], "right") == 429
    assert log_in(clients[1], "right") == 200
    for client in clients[1:]:
        assert log_in(client, "guess") == 400
    assert len(limit.clients) == 2  # the oldest address was forgotten
    assert log_in(clients[0], "right") == 200


def request(url: str, method: str, path: str, headers: dict[str, str], body: bytes | None = None
            ) -> tuple[int, str]:
    """One request with exactly these headers (Host included), through http.client."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read().decode("utf-8", "replace")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, engine_env) -> Iterator[str]:
    with running_app(tmp_path_factory.mktemp("host-guard") / "runs", engine_env) as url:
        yield url


def port_of(url: str) -> str:
    return url.rstrip("/").rsplit(":", 1)[1]


def call_poll(app: str, headers: dict[str, str]) -> tuple[int, str]:
    return request(app, "POST", "/gradio_api/call/poll", {"content-type": "application/json", **headers},
                   b'{"data": []}')


def test_app_refuses_other_host_names(app):
    evil, own = {"host": f"{EVIL}:{port_of(app)}"}, {"host": f"127.0.0.1:{port_of(app)}"}
    for method, path in (("GET", "/"), ("GET", "/gradio_api/info"), ("GET", "/config")):
        status, text = request(app, method, path, evil)
        assert status == 403 and text.startswith("refused: Host") and "DNS-rebinding" in text, (path, status)
        assert request(app, method, path, own)[0] == 200, path
    status, text = call_poll(app, evil)
    assert status == 403 and text.startswith("refused: Host"), (status, text)
    status, text = call_poll(app, own)
    assert status == 200 and "event_id" in text, (status, text)


def test_app_refuses_other_sites_posts(app):
    own = {"host": f"127.0.0.1:{port_of(app)}"}
    for origin in (f"http://{EVIL}", f"http://127.0.0.1:{int(port_of(app)) + 1}"):
        status, text = call_poll(app, {**own, "origin": origin})
        assert status == 403 and text.startswith("refused: a request from the page at"), (origin, status, text)
    for headers in (own, {**own, "origin": f"http://127.0.0.1:{port_of(app)}"}):
        status, text = call_poll(app, headers)
        assert status == 200 and "event_id" in text, (headers, status, text)


@contextlib.contextmanager
def app_with_auth(runs_dir: Path, env: dict[str, str], auth: str) -> Iterator[str]:
    """`python app.py --auth ...` in a subprocess (test_ui_client.running_app takes no extra arguments)."""
    port = free_port()
    log_path = runs_dir.parent / f"app-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--no-browser", "--port", str(port), "--runs-dir",
                                 str(runs_dir), "--auth", auth], cwd=ROOT, env={**env, "GRADIO_ANALYTICS_ENABLED":
                                "False"}, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the app did not start within 90 s"
                time.sleep(0.3)
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_app_limits_login_attempts(tmp_path, engine_env):
    with app_with_auth(tmp_path / "runs", engine_env, "user:right-pass") as url:
        def log_in(password: str) -> tuple[int, str]:
            form = urlencode({"username": "user", "password": password}).encode()
            return request(url, "POST", "/login", {"host": f"127.0.0.1:{port_of(url)}",
                                                   "content-type": "application/x-www-form-urlencoded"}, form)

        assert log_in("right-pass")[0] == 200
        assert [log_in(f"guess{i}")[0] for i in range(5)] == [400] * 5
        status, text = log_in("guess5")
        assert status == 429 and text.startswith("refused: too many failed logins"), (status, text)
        assert log_in("right-pass")[0] == 429  # while locked, even the right password waits
        deadline = time.monotonic() + 10
        while (status := log_in("right-pass")[0]) == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200
