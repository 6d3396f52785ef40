"""Upload an adapter, its PEFT export or the fused model to the Hugging Face Hub with a model card (card.py), then
list the repo's files and compare them with what was uploaded (size, and sha256 or git blob id).

The token comes from HF_TOKEN or a saved `hf auth login`, which huggingface_hub reads itself; it is never an
argument (a command line is visible to every process on the machine). The page passes its token field to the
push process through HF_TOKEN.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
FORMATS = ("adapter", "peft", "fused")
SKIP = {"check.json"}  # an earlier export's local check is not part of what is published


class PushError(ValueError):
    """A push that cannot be done or failed at the hub; one line."""


def stage(adapter_dir: Path, repo: str, fmt: str, folder: Path, model: str | None = None) -> dict[str, Any]:
    """The files to upload in `folder`: the adapter as it is, or exported, and the model card; returns the
    export's own checks (a fused model's logits against base + adapter), which are not uploaded."""
    from .card import write_card
    from .check import read_check
    from .export import export_adapter
    from .reader import is_peft_folder

    if fmt == "adapter" or (fmt == "peft" and is_peft_folder(adapter_dir)):
        shutil.copytree(adapter_dir, folder, ignore=shutil.ignore_patterns(*SKIP, ".*"))
    elif fmt == "peft":
        export_adapter(adapter_dir, "peft", folder, model=model)
    else:
        export_adapter(adapter_dir, "mlx", folder, model=model)
    checks = {k: v for k, v in (read_check(folder) or {}).items() if isinstance(v, dict)} if fmt != "adapter" else {}
    for name in SKIP:
        (folder / name).unlink(missing_ok=True)
    write_card(folder, adapter_dir, repo, fmt)
    return checks


def push(adapter_dir: Path, repo: str, fmt: str = "adapter", private: bool = False, model: str | None = None,
         log: Any = print) -> dict[str, Any]:
    """Create the repo if missing, upload the staged files in one commit, compare the listing; the check's result."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from .reader import read_adapter

    if not REPO_ID.match(repo):
        raise PushError(f"--repo {repo!r}: expected ORG/NAME (letters, digits, '.', '_', '-')")
    if fmt not in FORMATS:
        raise PushError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    read_adapter(adapter_dir)  # a broken adapter fails here, before the hub is asked anything
    if get_token() is None:
        raise PushError("no Hugging Face token: set the environment variable HF_TOKEN (a write token) or run "
                        "`hf auth login` once")
    api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"
        exported = stage(Path(adapter_dir), repo, fmt, folder, model)
        log(f"uploading {sum(1 for p in folder.rglob('*') if p.is_file())} files to {repo} ...")
        try:
            url = api.create_repo(repo, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo, folder_path=folder,
                                       commit_message=f"LoRA Studio: {fmt} from {Path(adapter_dir).name}")
            result = compare_listing(api, repo, commit.oid, folder)
        except HfHubHTTPError as e:
            said = getattr(e, "server_message", None) or str(e).splitlines()[0]
            raise PushError(f"the hub refused: {said}") from None
    return {**result, "repo": repo, "url": str(url), "commit": commit.oid, "private": private, "format": fmt,
            "export_checks": exported}


def compare_listing(api: Any, repo: str, revision: str, folder: Path) -> dict[str, Any]:
    """The repo's files at the new commit against the local ones: each present, same size, same content hash."""
    remote = {f.path: f for f in api.list_repo_tree(repo, revision=revision, recursive=True)
              if hasattr(f, "size") and hasattr(f, "blob_id")}
    problems = []
    local = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in local:
        name, data = path.relative_to(folder).as_posix(), path.read_bytes()
        entry = remote.get(name)
        if entry is None:
            problems.append(f"{name}: not in the repo")
        elif entry.size != len(data):
            problems.append(f"{name}: {entry.size} bytes in the repo, {len(data)} here")
        elif entry.lfs is not None and entry.lfs.sha256 != hashlib.sha256(data).hexdigest():
            problems.append(f"{name}: sha256 differs")
        elif entry.lfs is None and entry.blob_id != git_oid(data):
            problems.append(f"{name}: content differs")
    size = sum(p.stat().st_size for p in local)
    return {"check": "Hub listing vs uploaded files", "files": len(local), "bytes": size, "problems": problems,
            "ok": not problems,
            "summary": f"Hub: {len(local)} files ({size / 1e6:.1f} MB) listed in {repo} with the sizes and hashes "
                       f"uploaded" if not problems else f"Hub: {len(problems)} of {len(local)} files differ, e.g. "
                                                        f"{problems[0]}"}


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def push_and_report(args: Namespace) -> int:
    from .check import summary

    result = push(Path(args.adapter), args.repo, args.format, args.private, args.model,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    print(result["summary"])
    print(json.dumps({k: result[k] for k in ("url", "commit", "ok")}))
    for check in result["export_checks"].values():
        print(summary(check))
    if not result["ok"]:
        print(f"warning: {args.repo}: the uploaded files do not all match", file=sys.stderr)
        return 1
    return 0
