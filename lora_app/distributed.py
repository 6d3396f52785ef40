"""Data-parallel training over processes and machines through MLX's own launcher (`mlx.launch`).

Each rank runs the ordinary trainer: it reads its share of every batch (BatchPlan's rank/world_size),
mlx-lm's `average_gradients` averages the gradients, and only rank 0 writes to the run folder.

A hostfile is input from the user (an upload or `--hosts FILE`), and mlx.launch acts on every key in it: "envs"
are exported into every rank (a PYTHONPATH runs any code) and "ssh" names reach ssh's command line. So one checker
keeps only the fields understood here, and mlx.launch reads the checked copy written into the run folder.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, save_config_json
from .fileio import atomic_write_text
from .runs import TERMINAL, append_event, engine_env, run_state

HOSTFILE = "hosts.json"  # the checked copy in the run folder; the only hostfile mlx.launch is given
MAX_HOSTS = 1024
MAX_IPS = 64  # per host: the ring backend opens connections per IP
MAX_HOSTFILE_BYTES = 1 << 20
BACKENDS = ("ring", "mpi", "nccl")  # mlx.launch's; jaccl is left out: it needs "rdma" device lists
ENTRY_KEYS = ("ssh", "ips")
TOP_KEYS = ("hosts", "backend")
SHAPE = 'expected a list of {"ssh": "host", "ips": ["192.168.2.1"]} entries'
# An ssh target: letters, digits, ".", "-", "_", never a leading "-" (ssh would read it as an option).
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")


@dataclass
class Hosts:
    """A checked hostfile: the ranks' ssh targets and IPs, in rank order, and the backend if one was named."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    backend: str = ""

    def to_json(self) -> list | dict:
        return {"backend": self.backend, "hosts": self.entries} if self.backend else self.entries


def show(value: object, limit: int = 60) -> str:
    """A value from the file, quoted and cut short, so an error stays one readable line."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "…"


def plain_ip(text: str) -> str | None:
    """The address in canonical form, or None; a scoped IPv6 ("fe80::1%en0") is refused: its scope is free text."""
    try:
        return None if "%" in text else str(ipaddress.ip_address(text))
    except ValueError:
        return None


def is_ssh_target(target: str) -> bool:
    """`host` or `user@host`, host a name or an IP address."""
    user, at, host = target.rpartition("@")
    if at and not _USER.fullmatch(user):
        return False
    return bool(_HOST.fullmatch(host)) or plain_ip(host) is not None


def check_hostfile_data(data: object, source: str = "Hostfile", need_ips: bool = False) -> Hosts:
    """mlx.launch's hostfile (a JSON list of {"ssh": host, "ips": [...]}, or an object {"hosts": [...], "backend":
    ...}) -> the checked Hosts. Any other key is refused, not dropped, so the user learns it was not used.
    `need_ips`: refuse a host without IPs when the backend is ring or unnamed (mlx.launch's default off CUDA)."""
    entries = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: {SHAPE}")
    if len(entries) > MAX_HOSTS:
        raise ConfigError(f"{source}: {len(entries)} hosts; at most {MAX_HOSTS}")
    backend = check_top_level(data, source) if isinstance(data, dict) else ""
    hosts = [check_entry(entry, i, source) for i, entry in enumerate(entries, 1)]
    for i, h in enumerate(hosts, 1):
        if need_ips and backend in ("", "ring") and not h["ips"]:
            raise ConfigError(f'{source}: entry {i} ({h["ssh"]}) has no "ips"; the ring backend connects '
                              "by IP address")
    return Hosts(hosts, backend)


def check_top_level(data: dict, source: str) -> str:
    """The object form's keys: "hosts" and a backend mlx.launch knows ("" means mlx.launch's default)."""
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: the top level has {show(key)}, which this app does not pass on "
                              '(only "hosts" and "backend")')
    backend = data.get("backend", "")
    if backend != "" and backend not in BACKENDS:
        raise ConfigError(f'{source}: "backend" {show(backend)} is not one this app launches '
                          f"({', '.join(BACKENDS)})")
    return backend


def check_entry(entry: object, i: int, source: str) -> dict[str, Any]:
    """One host -> {"ssh": target, "ips": [addresses]}, or ConfigError naming the entry."""
    if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str) or not entry["ssh"].strip():
        raise ConfigError(f'{source}: {SHAPE} (entry {i} has no "ssh" host name)')
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"{source}: entry {i} has {show(key)}, which this app does not pass on "
                              '(only "ssh" and "ips")')
    ssh = entry["ssh"].strip()
    if not is_ssh_target(ssh):
        raise ConfigError(f'{source}: entry {i}: "ssh" {show(ssh)} is not a host name (host or user@host: '
                          'letters, digits, ".", "-", "_", not starting with "-")')
    return {"ssh": ssh, "ips": check_ips(entry.get("ips", []), i, source)}


def check_ips(ips: object, i: int, source: str) -> list[str]:
    if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
        raise ConfigError(f'{source}: {SHAPE} (entry {i}: "ips" must be a list of addresses)')
    if len(ips) > MAX_IPS:
        raise ConfigError(f'{source}: entry {i} has {len(ips)} "ips"; at most {MAX_IPS}')
    checked = [plain_ip(ip.strip()) for ip in ips]
    for ip, ok in zip(ips, checked):
        if ok is None:
            raise ConfigError(f'{source}: entry {i}: "ips" {show(ip)} is not an IP address')
    return checked


def read_hostfile(path: str | Path, source: str, need_ips: bool = False) -> Hosts:
    """A hostfile on disk -> the checked Hosts; errors start with `source` (the field or flag)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{source}: file not found")
    if path.stat().st_size > MAX_HOSTFILE_BYTES:  # bounded before it is read: a hostfile is a few lines
        raise ConfigError(f"{source}: larger than {MAX_HOSTFILE_BYTES // 1024} KiB; not a hostfile")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{source}: cannot read it ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{source}: not valid JSON ({e})") from None
    return check_hostfile_data(data, source, need_ips)


def write_hostfile(run_dir: Path, hosts: Hosts) -> Path:
    """The run folder's hosts.json: only the checked fields, written atomically."""
    path = Path(run_dir) / HOSTFILE
    atomic_write_text(path, json.dumps(hosts.to_json(), indent=1) + "\n")
    return path


def launch_command(run_dir: Path, nproc: int, hostfile: str | None, resume: bool) -> list[str]:
    """mlx.launch's command line. A hostfile is checked, then its checked copy is written into the run folder
    and handed to mlx.launch: the user's file, which may change after the check, is never what runs."""
    inner = [sys.executable, "-m", "lora_app", "train", "--launched"]
    inner += ["--resume", str(run_dir)] if resume else ["--config", str(run_dir / "config.json"),
                                                        "--out", str(run_dir)]
    launcher = [str(Path(sys.executable).parent / "mlx.launch")]
    if hostfile:
        hosts = read_hostfile(hostfile, f"--hosts {hostfile}")
        launcher += ["--hostfile", str(write_hostfile(Path(run_dir), hosts))]
    else:
        launcher += ["--hosts", "127.0.0.1", "--repeat-hosts", str(nproc), "--backend", "ring"]
    return [*launcher, "--", *inner]


def launch(run_dir: Path, cfg: RunConfig, nproc: int, hostfile: str | None, resume: bool = False) -> int:
    """Write the run folder's config, then run every rank through mlx.launch; returns its exit code."""
    world = nproc if not hostfile else None
    if world and cfg.train.batch_size % world:
        raise ConfigError(f"batch_size {cfg.train.batch_size} must be divisible by --nproc {world}")
    command = launch_command(Path(run_dir), nproc, hostfile, resume)
    if not resume:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_config_json(cfg, Path(run_dir) / "config.json")
    print("launching:", " ".join(command), flush=True)
    code = subprocess.run(command, env=engine_env()).returncode
    if code and run_state(run_dir).status not in TERMINAL:  # no rank said why (ssh failed, a bad hostfile, a crash)
        message = f"mlx.launch exited with code {code} before the run ended; its output is in train.log"
        append_event(Path(run_dir), "error", message=message)
        append_event(Path(run_dir), "status", status="error", message=message)
    return code


# ---- inside a training process: every rank takes the same branches ------------------------------------------

def world() -> tuple[int, int]:
    """(rank, number of processes) of this process; (0, 1) when mlx.launch did not start it."""
    import mlx.core as mx

    group = mx.distributed.init()
    return group.rank(), group.size()


def all_sum(value: Any) -> Any:
    """The sum of an array over all processes (the array itself in a single process)."""
    import mlx.core as mx

    return mx.distributed.all_sum(value, stream=mx.cpu)


def agree(flags: list[bool], size: int) -> list[int]:
    """Each flag counted over all processes: a stop, a pause or a bad loss seen by one rank ends every rank at the
    same step (a rank left waiting in a collective would hang)."""
    if size == 1:
        return [int(f) for f in flags]
    import mlx.core as mx

    return all_sum(mx.array([int(f) for f in flags], dtype=mx.int32)).tolist()


def host_names(rank: int, size: int, width: int = 64) -> list[str]:
    """Every rank's host name, in rank order: each rank fills its own row of a zero matrix and all_sum gives every
    rank the whole table."""
    import socket

    import mlx.core as mx

    name = socket.gethostname().encode("utf-8")[:width]
    if size == 1:
        return [name.decode("utf-8", "replace")]
    rows = [[0] * width for _ in range(size)]
    rows[rank][:len(name)] = list(name)
    table = all_sum(mx.array(rows, dtype=mx.int32)).tolist()
    return [bytes(b for b in row if b).decode("utf-8", "replace") for row in table]
