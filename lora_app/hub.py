"""Models from the Hugging Face hub: look one up, plan its download, download it, find it in the cache.

Everything goes through `huggingface_hub` into its own cache (HF_HUB_CACHE), so mlx-lm, transformers and the
`hf` CLI see the same files. Only the files a model needs are fetched (`MODEL_FILES`). Nothing here downloads
as a side effect: `models.resolve_model` uses `cached_model`, and only `download` (the app's Download button,
`python -m lora_app download`) transfers weights. The token, when None, is huggingface_hub's own choice: HF_TOKEN,
then the saved `hf auth login`. No gradio and no MLX here; huggingface_hub is imported where it is used.
"""

from __future__ import annotations

import errno
import json
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

WEIGHTS = "model*.safetensors"  # what mlx_lm.load reads (a nested or `consolidated.safetensors` copy is not)
MODEL_FILES = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "tiktoken.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
    WEIGHTS, "model.safetensors.index.json",
]
CHUNK_BYTES = 64 * 1024  # huggingface_hub reads 10 MiB between progress updates; this gives ~4 a second at 256 kB/s
REPORT_EVERY_S = 0.25
RATE_WINDOW_S = 5.0
CANCEL_GRACE_S = 2.0  # a cancelled transfer stops at its next chunk; one stalled on a dead link is not waited for
LOGIN_HINT = "the token field in the app, HF_TOKEN for the CLI, or `hf auth login`"


class HubError(ValueError):
    """A hub problem in one line the user can act on (no traceback)."""


class DownloadCancelled(HubError):
    """The download was cancelled; its partial files are gone."""


@dataclass
class Plan:
    repo: str
    revision: str  # the commit the files come from
    files: list[tuple[str, int]]  # (name in the repo, bytes)
    total_bytes: int
    missing_bytes: int  # not in the cache yet


@dataclass(frozen=True)
class Progress:
    done_bytes: int
    total_bytes: int
    rate_bytes_per_s: float
    eta_s: float | None
    files_done: int
    files_total: int

    def to_json(self) -> dict[str, Any]:
        return {"done": self.done_bytes, "total": self.total_bytes, "rate": round(self.rate_bytes_per_s, 1),
                "eta": None if self.eta_s is None else round(self.eta_s, 1), "files_done": self.files_done,
                "files_total": self.files_total}


# ---- the cache ----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def repo_folder(repo: str) -> Path:
    """The repo's folder in the cache (models--org--name), whether it exists or not."""
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


def is_complete(folder: Path) -> bool:
    """config.json and every weight file (all shards the index names), links into the cache followed."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return bool(shards) and all((folder / s).is_file() for s in shards)
    return any(p.is_file() for p in folder.glob(WEIGHTS))


def cached_model(repo: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of `repo` that holds a whole model, or None; never touches the network. Without a
    revision: the one `main` points to, else the newest complete snapshot (say, one downloaded by commit)."""
    if not is_repo_id(repo):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        path = None
    if path is not None and is_complete(path):
        return path
    if revision is not None:
        return None
    snapshots = sorted((repo_folder(repo) / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((s for s in snapshots if is_complete(s)), None)


def cached_models() -> list[dict[str, Any]]:
    """Every model in the hub cache that can be loaded: {repo, path, revision, size_bytes, refs}, by repo id."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir())
    except (CacheNotFound, OSError, ValueError):
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        rev = next((r for r in revisions if is_complete(Path(r.snapshot_path))), None)
        if rev is not None:
            found.append({"repo": repo.repo_id, "path": str(rev.snapshot_path), "revision": rev.commit_hash,
                          "size_bytes": int(rev.size_on_disk), "refs": sorted(rev.refs)})
    return found


def partial_files(repo: str) -> list[Path]:
    """Temporary files of downloads into this repo's blobs (`<etag>.<random>.incomplete`)."""
    return sorted((repo_folder(repo) / "blobs").glob("*.incomplete"))


def remove_partial_files(repo: str) -> int:
    """Delete the repo's temporary download files that no live download is writing; how many went.

    huggingface_hub holds `.locks/<repo folder>/<etag>.lock` while it writes a blob's temporary file; a process
    killed mid-file leaves the file behind and its lock free."""
    from filelock import FileLock, Timeout

    locks = cache_dir() / ".locks" / repo_folder(repo).name
    removed = 0
    for part in partial_files(repo):
        etag = part.name.split(".", 1)[0]
        try:
            locks.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(locks / f"{etag}.lock"), mode=0o664)
            lock.acquire(blocking=False)
        except (Timeout, OSError, NotImplementedError, RuntimeError):
            continue  # held by a live download (or cannot be told): leave it
        try:
            part.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        finally:
            lock.release()
    return removed


# ---- the hub ------------------------------------------------------------------------------------------------

def is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(text, str) or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_repo_id(repo: str) -> None:
    if not is_repo_id(repo):
        raise HubError(f"{repo!r} is not a hub repo id: expected org/name, as in https://huggingface.co/org/name")


def plan_download(repo: str, revision: str | None = None, token: str | None = None) -> Plan:
    """What `download` would fetch: the model's files with their sizes, and how much is not cached yet.
    HubError for a repo that cannot be read or holds no model this app loads."""
    from huggingface_hub import snapshot_download

    check_repo_id(repo)
    try:
        infos = snapshot_download(repo, revision=revision, token=token or None, allow_patterns=MODEL_FILES,
                                  dry_run=True, tqdm_class=QuietBar)
    except Exception as e:  # noqa: BLE001 - every hub or network error becomes one line
        raise HubError(describe_hub_error(e, repo, revision)) from None
    files = sorted((i.filename, int(i.file_size or 0)) for i in infos)
    check_usable(repo, [name for name, _ in files], lambda: list_files(repo, infos[0].commit_hash, token))
    return Plan(repo=repo, revision=infos[0].commit_hash, files=files, total_bytes=sum(s for _, s in files),
                missing_bytes=sum(int(i.file_size or 0) for i in infos if i.will_download))


def list_files(repo: str, revision: str, token: str | None) -> list[str]:
    from huggingface_hub import HfApi

    try:
        return HfApi(token=token or None).list_repo_files(repo, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise HubError(describe_hub_error(e, repo, revision)) from None


def check_usable(repo: str, needed: list[str], everything: Callable[[], list[str]]) -> None:
    """Refuse a repo whose model files lack config.json or safetensors weights, saying what it has instead."""
    if "config.json" not in needed:
        raise HubError(f"{repo} has no config.json: not a model in the transformers / MLX layout this app loads")
    if any(fnmatchcase(name, WEIGHTS) for name in needed):
        return
    names = everything()
    has = lambda *suffixes: any(n.lower().endswith(suffixes) for n in names)  # noqa: E731
    if has(".gguf"):
        what = "GGUF files (llama.cpp's format)"
    elif has(".bin", ".pt", ".pth", ".ckpt"):
        what = "PyTorch weights (.bin/.pt)"
    elif has(".safetensors"):
        what = "safetensors files, but none named model*.safetensors at the top level"
    else:
        what = "no weight files"
    raise HubError(f"{repo} has {what} and no model*.safetensors weights, which this app (and mlx-lm) loads: "
                   "choose a repo with safetensors weights, e.g. an mlx-community conversion")


def remote_summary(repo: str, revision: str | None = None, token: str | None = None) -> dict[str, Any]:
    """A repo on the hub before downloading it: {repo, revision, download_bytes, files, gated, license, config}.
    `download_bytes` counts MODEL_FILES only; config is the parsed config.json (fetched alone, into the cache)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    check_repo_id(repo)
    api = HfApi(token=token or None)
    try:
        info = api.model_info(repo, revision=revision)
        sizes = {f.path: int(f.size or 0) for f in api.list_repo_tree(repo, revision=info.sha, recursive=True)
                 if isinstance(f, RepoFile)}
    except Exception as e:  # noqa: BLE001
        raise HubError(describe_hub_error(e, repo, revision)) from None
    needed = sorted(filter_repo_objects(sizes, allow_patterns=MODEL_FILES))
    check_usable(repo, needed, lambda: list(sizes))
    try:
        config_file = hf_hub_download(repo, "config.json", revision=info.sha, token=token or None,
                                      tqdm_class=QuietBar)
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except ValueError as e:
        raise HubError(f"{repo}: its config.json is not valid JSON ({e})") from None
    except Exception as e:  # noqa: BLE001
        raise HubError(describe_hub_error(e, repo, revision)) from None
    return {"repo": repo, "revision": info.sha, "download_bytes": sum(sizes[n] for n in needed),
            "files": [[n, sizes[n]] for n in needed], "gated": bool(info.gated), "license": license_of(info),
            "config": config}


def license_of(info: Any) -> str:
    card = getattr(info, "card_data", None)
    name = getattr(card, "license", None) if card is not None else None
    if not name:
        name = next((t.split(":", 1)[1] for t in info.tags or [] if t.startswith("license:")), "")
    return str(name or "")


# ---- downloading --------------------------------------------------------------------------------------------

def download(repo: str, revision: str | None = None, token: str | None = None,
             on_progress: Callable[[Progress], None] | None = None,
             cancel: threading.Event | None = None) -> Path:
    """Download the model's files into the hub cache and return its snapshot folder. `on_progress` gets a
    Progress at most ~4 times a second while bytes flow, and once at the end. Setting `cancel` stops the
    transfer and deletes its partial files (DownloadCancelled)."""
    from huggingface_hub import constants, snapshot_download

    plan = plan_download(repo, revision, token)
    check_disk_space(plan)
    remove_partial_files(repo)
    cancel = cancel or threading.Event()
    if cancel.is_set():
        raise DownloadCancelled(f"download of {repo} cancelled")
    meter = Meter(plan, on_progress, cancel)
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, CHUNK_BYTES)
    others = set(partial_files(repo))  # written by live downloads in other processes
    outcome: dict[str, Any] = {}

    def fetch() -> None:
        try:
            outcome["path"] = snapshot_download(repo, revision=revision, token=token or None,
                                                allow_patterns=MODEL_FILES, tqdm_class=meter.bar_class())
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = e

    # In a thread of its own, so that a cancel is answered even while a transfer waits on a silent connection.
    worker = threading.Thread(target=fetch, name=f"download {repo}", daemon=True)
    worker.start()
    while worker.is_alive() and not cancel.wait(0.1):
        pass
    if cancel.is_set() and "path" not in outcome:
        worker.join(CANCEL_GRACE_S)
        for part in set(partial_files(repo)) - others:  # left by a transfer that did not stop in time
            part.unlink(missing_ok=True)
        raise DownloadCancelled(f"download of {repo} cancelled")
    if "error" in outcome:
        raise HubError(describe_hub_error(outcome["error"], repo, revision)) from None
    path = Path(outcome["path"])
    if not is_complete(path):
        raise HubError(f"{repo}: the download ended without a whole model in {path}; run it again")
    meter.finish()
    return path


def check_disk_space(plan: Plan) -> None:
    folder = cache_dir()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if plan.missing_bytes > free:
        raise HubError(f"not enough disk space for {plan.repo}: {human_bytes(plan.missing_bytes)} to download, "
                       f"{human_bytes(free)} free at {folder}; free some space or point HF_HUB_CACHE at a larger disk")


class QuietBar:
    """What huggingface_hub asks of a `tqdm_class` progress bar, drawing nothing. snapshot_download makes three
    (bytes received, bytes written to files, files done); a Meter counts the last two."""

    meter: Meter | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.n = kwargs.get("initial") or 0
        self.total = kwargs.get("total")
        self.desc = kwargs.get("desc") or ""
        self.format_dict: dict[str, Any] = {"rate": None}
        if kwargs.get("unit", "it") != "B":
            self.kind = "files"
        else:
            self.kind = "received" if self.desc.startswith("Downloading bytes") else "written"

    def update(self, n: float | None = 1) -> None:
        self.n += n or 0
        if self.meter is not None:
            self.meter.count(self.kind, int(n or 0))

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        pass

    close = clear = refresh

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    set_description_str = set_description

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def __enter__(self) -> QuietBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Meter:
    """Bytes and files of one download, from huggingface_hub's progress bars (called from its worker threads):
    reports a Progress now and then, and stops the transfer at its next chunk once `cancel` is set."""

    def __init__(self, plan: Plan, on_progress: Callable[[Progress], None] | None, cancel: threading.Event):
        self.cached = plan.total_bytes - plan.missing_bytes
        self.total, self.files_total = plan.total_bytes, len(plan.files)
        self.on_progress, self.cancel = on_progress, cancel
        self.received = self.files_done = 0
        self.started = self.last = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()

    def bar_class(self) -> type[QuietBar]:
        return type("MeteredBar", (QuietBar,), {"meter": self})

    def count(self, kind: str, n: int) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled("download cancelled")
        with self.lock:
            if kind == "written":
                self.received += n
            elif kind == "files":
                self.files_done += n
            else:
                return
            now = time.monotonic()
            if self.received and now - self.last >= REPORT_EVERY_S or self.last == self.started:
                self.report(now)

    def finish(self) -> None:
        with self.lock:
            self.files_done = self.files_total
            self.report(time.monotonic(), done=self.total)

    def report(self, now: float, done: int | None = None) -> None:
        self.last = now
        done = self.cached + self.received if done is None else done
        self.total = max(self.total, done)
        self.samples.append((now, self.received))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()
        t0, r0 = self.samples[0] if len(self.samples) > 1 else (self.started, 0)
        rate = max(0.0, (self.received - r0) / (now - t0)) if now > t0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else None
        if self.on_progress is not None:
            self.on_progress(Progress(done, self.total, rate, eta, min(self.files_done, self.files_total),
                                      self.files_total))


# ---- errors -------------------------------------------------------------------------------------------------

def describe_hub_error(exc: BaseException, repo: str, revision: str | None = None) -> str:
    """One line for the user from a huggingface_hub / network error: what happened and what to do."""
    import httpx2
    from huggingface_hub import constants, errors

    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__

    def find(*kinds: type) -> Any:
        return next((c for c in chain if isinstance(c, kinds)), None)

    page = f"https://huggingface.co/{repo}"
    host = urlparse(constants.ENDPOINT).netloc or constants.ENDPOINT
    if (found := find(HubError)) is not None:
        return str(found)
    if (found := find(errors.GatedRepoError)) is not None:
        if status_of(found) == 403:
            return (f"{repo} is gated and the token's account has no access yet: accept its license at {page} "
                    "(signed in as that account), then retry")
        return f"{repo} is gated: accept its license at {page}, then give a token of that account ({LOGIN_HINT})"
    if find(errors.RevisionNotFoundError) is not None:
        return f"{repo}: revision {revision or 'main'!r} not found (give a branch, tag or commit of the repo)"
    if find(errors.RepositoryNotFoundError) is not None:
        return (f"{repo}: no such model on the hub (check the name at {page}); a private repo needs a token "
                f"({LOGIN_HINT})")
    if (found := find(errors.RemoteEntryNotFoundError)) is not None:
        return f"{repo}: a file the model needs is not on the hub ({first_line(found)})"
    if (found := find(errors.HfHubHTTPError)) is not None:
        code = status_of(found)
        if code == 401:
            return f"{repo}: the hub refused the token (invalid or expired): give a valid one ({LOGIN_HINT})"
        if code == 403:
            return f"{repo}: the token may not read this repo (a fine-grained token needs read access to it)"
        if code == 429:
            return f"{repo}: the hub is rate-limiting this address (429): wait a few minutes and retry"
        if code and code >= 500:
            return f"{repo}: the hub answered {code} (a problem on its side): try again later"
    if find(errors.OfflineModeIsEnabled) is not None:
        return f"{repo}: HF_HUB_OFFLINE is set, so nothing is downloaded; unset it to download"
    if find(httpx2.TransportError, ConnectionError, TimeoutError, errors.LocalEntryNotFoundError,
            errors.DryRunError) is not None:
        return f"cannot reach {host} (no network connection, or HF_ENDPOINT is wrong): check it and retry"
    if (found := find(OSError)) is not None and found.errno == errno.ENOSPC:
        return f"the disk is full (downloading {repo} into {cache_dir()}): free space or set HF_HUB_CACHE elsewhere"
    if find(errors.HFValidationError) is not None:
        return f"{repo!r} is not a hub repo id: expected org/name"
    return f"{repo}: {type(exc).__name__}: {first_line(exc)}"


def status_of(error: Any) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
