"""A local stand-in for the Hugging Face hub's download endpoints, for the real `huggingface_hub` client pointed at
it through HF_ENDPOINT. No network: a ThreadingHTTPServer on 127.0.0.1 in a thread.

It answers what huggingface_hub 2.x asks of huggingface.co for model_info, snapshot_download and hf_hub_download:
- `GET /api/models/{repo}[/revision/{rev}]`: the repo's info (sha, gated, cardData, siblings);
- `GET /api/models/{repo}/tree/{rev}?recursive=true`: files with size, git oid, and `lfs` for large files;
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: small files directly (ETag = git oid, X-Repo-Commit, Content-Length,
  Range); large (LFS) files with a 302 to a "CDN" (`http://localhost:PORT/cdn/<sha256>`, another origin, so the
  client drops its token there, as it does for the real CDN) with X-Linked-Etag / X-Linked-Size, as the hub does.
Errors carry the hub's `X-Error-Code` / `X-Error-Message`: an unknown repo is 401 without a token and 404 with
one (RepoNotFound); an unknown revision 404 (RevisionNotFound); a missing file 404 (EntryNotFound); a gated repo's
files 401 without a token and 403 with a token that was not granted access (GatedRepo); a token the hub does not
know 401 "Invalid credentials in Authorization header". `throttle` (bytes/s per response) slows file bodies so a
test can stop a download mid-file; `requests` records every request.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".pt", ".pth", ".h5", ".msgpack")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    license: str = "apache-2.0"
    sha: str = ""  # the commit; derived from the files when empty

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.sha = digest.hexdigest()

    @classmethod
    def from_folder(cls, folder: Path, extra: dict[str, bytes] | None = None, **kwargs) -> FakeRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls({**files, **(extra or {})}, **kwargs)


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    tokens: dict[str, set[str]] = field(default_factory=dict)  # token -> gated repos it was granted
    throttle: int | None = None  # bytes per second of each file body; None: as fast as it goes
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (Handler,), {"hub": self}))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def record(self, method: str, path: str) -> None:
        with self.lock:
            self.requests.append((method, path))

    def count(self, contains: str = "") -> int:
        with self.lock:
            return sum(contains in path for _, path in self.requests)

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for data in repo.files.values():
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects of the hub
    hub: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.route()

    def do_HEAD(self) -> None:
        self.route()

    # ---- routing ----

    def route(self) -> None:
        self.hub.record(self.command, self.path)
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        auth = self.headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token is not None and token not in self.hub.tokens:
            return self.error(401, None, "Invalid credentials in Authorization header")
        if parts[:1] == ["cdn"] and len(parts) == 2:
            data = self.hub.blob(parts[1])
            return self.send_file(data, {"ETag": f'"{parts[1]}"'}) if data is not None else self.error(404, None,
                                                                                                       "Not found")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self.api(f"{parts[2]}/{parts[3]}", parts[4:], token, parse_qs(url.query))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), token)
        return self.error(404, None, "Not found")

    def find(self, name: str, token: str | None) -> FakeRepo | None:
        repo = self.hub.repos.get(name)
        if repo is None:  # the hub does not tell an anonymous caller whether a private repo exists
            self.error(404 if token else 401, "RepoNotFound", "Repository not found")
        return repo

    def check_revision(self, repo: FakeRepo, rev: str) -> bool:
        if rev in ("main", repo.sha):
            return True
        self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    def api(self, name: str, rest: list[str], token: str | None, query: dict) -> None:
        repo = self.find(name, token)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            if self.check_revision(repo, rest[1] if len(rest) > 1 else "main"):
                self.json(info(name, repo))
        elif rest[0] == "tree" and len(rest) >= 2:
            if self.check_revision(repo, rest[1]):
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                self.json(tree(repo, "/".join(rest[2:]), recursive))
        else:
            self.error(404, None, "Not found")

    def resolve(self, name: str, rev: str, path: str, token: str | None) -> None:
        repo = self.find(name, token)
        if repo is None or not self.check_revision(repo, rev):
            return
        data = repo.files.get(path)
        if data is None:
            return self.error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"",
                              {"X-Repo-Commit": repo.sha})
        if repo.gated and name not in self.hub.tokens.get(token or "", set()):
            if token is None:
                return self.error(401, "GatedRepo", f"Access to model {name} is restricted. You must have access to "
                                                    "it and be authenticated to access it. Please log in.")
            return self.error(403, "GatedRepo", f"Access to model {name} is restricted and you are not in the "
                                                f"authorized list. Visit https://huggingface.co/{name} to ask for "
                                                "access.")
        headers = {"X-Repo-Commit": repo.sha}
        if is_lfs(path):
            sha256 = hashlib.sha256(data).hexdigest()
            return self.reply(302, b"", {**headers, "Location": f"{self.hub.cdn}/cdn/{sha256}",
                                         "ETag": f'"{git_oid(data)}"', "X-Linked-Etag": f'"{sha256}"',
                                         "X-Linked-Size": str(len(data))})
        self.send_file(data, {**headers, "ETag": f'"{git_oid(data)}"'})

    # ---- responses ----

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def json(self, value) -> None:
        self.reply(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        extra = {"Content-Type": "application/json", "X-Error-Message": message, **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self.reply(status, json.dumps({"error": message}).encode(), extra)

    def send_file(self, data: bytes, headers: dict[str, str]) -> None:
        start, status = 0, 200
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged[6:].split("-")[0].isdigit():
            start, status = int(ranged[6:].split("-")[0]), 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream", **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        rate = self.hub.throttle
        piece = max(1024, rate // 20) if rate else len(body) or 1
        try:
            for i in range(0, len(body), piece):
                self.wfile.write(body[i:i + piece])
                if rate:
                    self.wfile.flush()
                    time.sleep(piece / rate)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (a killed download)
            self.close_connection = True


def info(name: str, repo: FakeRepo) -> dict:
    return {"_id": repo.sha[:24], "id": name, "modelId": name, "author": name.split("/")[0], "sha": repo.sha,
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z", "private": False,
            "disabled": False, "gated": "manual" if repo.gated else False, "downloads": 0, "likes": 0,
            "library_name": "transformers", "tags": ["transformers", "safetensors", f"license:{repo.license}"],
            "cardData": {"license": repo.license}, "siblings": [{"rfilename": n} for n in sorted(repo.files)]}


def tree(repo: FakeRepo, under: str, recursive: bool) -> list[dict]:
    prefix = f"{under}/" if under else ""
    entries, folders = [], set()
    for name in sorted(repo.files):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if "/" in rest and not recursive:
            folders.add(prefix + rest.split("/")[0])
            continue
        parts = rest.split("/")[:-1]
        folders.update(prefix + "/".join(parts[:i + 1]) for i in range(len(parts)))
        data = repo.files[name]
        entry = {"type": "file", "oid": git_oid(data), "size": len(data), "path": name}
        if is_lfs(name):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        entries.append(entry)
    return [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)] + entries
