"""tests/hubserver.py's fake hub plus the upload endpoints huggingface_hub 2.x calls for create_repo and
upload_folder (hf_api.py, _commit_api.py, lfs.py), so a push runs the real client end to end with no network:

- `POST /api/repos/create` {name, organization, visibility}: 200 {url}; 409 {error, url} when it exists;
- `POST /api/validate-yaml` {content}: the README's metadata, 400 {errors} when it is not a YAML mapping;
- `POST /api/models/{repo}/preupload/{rev}` {files: [{path, sample, size}]}: uploadMode "lfs" for the hub's LFS
  suffixes (as hubserver's downloads serve them), else "regular";
- `POST /{repo}.git/info/lfs/objects/batch` (basic transfer): an upload action per object not yet stored,
  then `PUT /lfs-upload/{sha256}` (the body's sha256 must match) and `POST /lfs-verify` {oid, size};
- `POST /api/models/{repo}/commit/{rev}` (ndjson): header, `file` (inline base64), `lfsFile` (a stored sha256);
  the repo's files and commit sha change, and the download side (info, tree, resolve) serves the new files.
Xet storage is out of reach of a fake, so the client is run with HF_HUB_DISABLE_XET (its legacy LFS path, which
the real hub still serves). Every upload endpoint wants a token the hub knows (`tokens`), 401 otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import yaml
from hubserver import FakeHub, FakeRepo, Handler, is_lfs


@dataclass
class UploadHub(FakeHub):
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> LFS object uploaded, maybe not committed
    created: dict[str, dict] = field(default_factory=dict)  # repo -> the create request's payload
    commits: list[dict] = field(default_factory=list)  # (repo, header, paths) of each commit
    tamper: set[str] = field(default_factory=set)  # paths stored with a byte added: a hub that lost data

    def __post_init__(self) -> None:
        super().__post_init__()
        self.server.RequestHandlerClass = type("UploadHandler", (UploadHandler,), {"hub": self})

    def blob(self, sha256: str) -> bytes | None:
        return self.blobs.get(sha256) or super().blob(sha256)


class UploadHandler(Handler):
    hub: UploadHub

    def do_POST(self) -> None:
        self.upload_route()

    def do_PUT(self) -> None:
        self.upload_route()

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def upload_route(self) -> None:
        self.hub.record(self.command, self.path)
        data = self.body()
        auth = self.headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if parts[:1] == ["lfs-upload"] and self.command == "PUT":  # the "S3" presigned URL: no token needed
            return self.lfs_put(parts[1], data)
        if token not in self.hub.tokens:
            return self.error(401, None, "Invalid credentials in Authorization header" if token else
                              "You must be authenticated to upload")
        if parts == ["api", "repos", "create"]:
            return self.create(json.loads(data))
        if parts == ["api", "validate-yaml"]:
            return self.validate_yaml(json.loads(data)["content"])
        if parts == ["lfs-verify"]:
            oid = json.loads(data)["oid"]
            return self.json({"ok": True}) if oid in self.hub.blobs else self.error(404, None, "not uploaded")
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self.lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}", json.loads(data))
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            repo = self.find(f"{parts[2]}/{parts[3]}", token)
            if repo is None:
                return None
            if parts[4] == "preupload":
                return self.json({"files": [{"path": f["path"], "uploadMode": "lfs" if is_lfs(f["path"]) else
                                             "regular", "shouldIgnore": False, "oid": None}
                                            for f in json.loads(data)["files"]]})
            return self.commit(f"{parts[2]}/{parts[3]}", repo, data)
        return self.error(404, None, "Not found")

    def create(self, payload: dict) -> None:
        name = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if name in self.hub.repos:  # the hub's 409 carries the url too; create_repo(exist_ok=True) reads it
            message = "You already created this model repo"
            return self.reply(409, json.dumps({"error": message, "url": f"{self.hub.url}/{name}"}).encode(),
                              {"Content-Type": "application/json", "X-Error-Message": message})
        self.hub.repos[name] = FakeRepo({})
        self.hub.created[name] = payload
        self.json({"url": f"{self.hub.url}/{name}", "name": name})

    def validate_yaml(self, content: str) -> None:
        meta = content.split("---\n")[1] if content.startswith("---\n") else ""
        try:
            ok = isinstance(yaml.safe_load(meta), dict)
        except yaml.YAMLError:
            ok = False
        if not ok:
            return self.reply(400, json.dumps({"errors": [{"message": "metadata is not a YAML mapping"}]}).encode(),
                              {"Content-Type": "application/json"})
        self.json({"errors": [], "warnings": []})

    def lfs_batch(self, name: str, payload: dict) -> None:
        if name not in self.hub.repos:
            return self.error(404, "RepoNotFound", "Repository not found")
        objects = []
        for o in payload["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.hub.blobs:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{o['oid']}"},
                                    "verify": {"href": f"{self.hub.url}/lfs-verify"}}
            objects.append(entry)
        self.json({"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, None, "sha256 does not match")
        self.hub.blobs[oid] = data
        self.reply(200, b"", {})

    def commit(self, name: str, repo: FakeRepo, data: bytes) -> None:
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        files = dict(repo.files)
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.blobs:
                    return self.error(422, None, f"{value['path']}: LFS object {value['oid']} was not uploaded")
                files[value["path"]] = self.hub.blobs[value["oid"]]
            else:
                return self.error(400, None, f"unsupported commit operation {item['key']}")
        files.update({p: files[p] + b"\0" for p in self.hub.tamper if p in files})
        new = FakeRepo(files)
        repo.files, repo.sha = new.files, new.sha
        self.hub.commits.append({"repo": name, "header": lines[0]["value"], "paths": [i["value"]["path"]
                                                                                     for i in lines[1:]]})
        self.json({"commitUrl": f"{self.hub.url}/{name}/commit/{repo.sha}", "commitOid": repo.sha,
                   "success": True})
