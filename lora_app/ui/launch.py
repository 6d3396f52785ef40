"""The Train step's data-parallel choice: this process, N processes here, a hostfile, or a list of hosts.

Engine-free. The choice is checked before a run folder exists, then written into it (hosts.json, the
mlx.launch hostfile; launch.json, the choice), so the run is self-contained and Resume launches it the same way.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

MODES = ("this process", "N processes on this machine", "machines from a hostfile", "a list of hosts")
HOSTFILE = "hosts.json"
LAUNCH = "launch.json"


@dataclass
class Launch:
    """A checked choice: nproc > 1 for processes here, or the hostfile text to write into the run folder."""

    nproc: int = 0
    hostfile_text: str | None = None
    world_size: int = 1


def resolve_ipv4(host: str) -> str:
    """The IPv4 address of a host name (mlx.launch's ring backend connects by IP, not by name)."""
    return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]


def parse_nproc(nproc: object, cpus: int) -> int:
    try:
        n = int(nproc)
        if n != float(nproc):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"Processes: {nproc!r} is not a whole number") from None
    if n == 1:
        return 1
    if not 2 <= n <= cpus:
        raise ConfigError(f"Processes: {n} is not between 2 and this machine's {cpus} CPU cores")
    return n


def check_hostfile_data(data: object, source: str = "Hostfile") -> list[dict]:
    """mlx.launch's hostfile: a JSON list of {"ssh": host, "ips": [...]} (or an object with "hosts").
    The ring backend (the default off CUDA) needs every host's IP; the names it ssh's into may differ."""
    hosts = data.get("hosts") if isinstance(data, dict) else data
    backend = data.get("backend", "") if isinstance(data, dict) else ""
    shape = f'{source}: expected a list of {{"ssh": "host", "ips": ["192.168.2.1"]}} entries'
    if not isinstance(hosts, list) or not hosts:
        raise ConfigError(shape)
    for i, h in enumerate(hosts, 1):
        if not isinstance(h, dict) or not isinstance(h.get("ssh"), str) or not h["ssh"].strip():
            raise ConfigError(f"{shape} (entry {i} has no \"ssh\" host name)")
        ips = h.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ConfigError(f"{shape} (entry {i}: \"ips\" must be a list of addresses)")
        if backend in ("", "ring") and not ips:
            raise ConfigError(f"{source}: entry {i} ({h['ssh']}) has no \"ips\"; the ring backend connects "
                              "by IP address")
    return hosts


def read_hostfile(path: str | Path) -> str:
    """The uploaded hostfile's text, checked."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as e:
        raise ConfigError(f"Hostfile: cannot read it ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"Hostfile: not valid JSON ({e})") from None
    check_hostfile_data(data)
    return text


def hosts_to_hostfile(text: str, resolve=resolve_ipv4) -> list[dict]:
    """One host per line (`mac1.local`, `user@10.0.0.2`) -> hostfile entries; the first line is rank 0."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise ConfigError("Hosts: empty; write one host per line (mac1.local or user@10.0.0.2)")
    entries = []
    for line in lines:
        if any(c.isspace() for c in line):
            raise ConfigError(f"Hosts: {line!r} contains a space; write one host per line")
        host = line.rsplit("@", 1)[-1]
        if not host:
            raise ConfigError(f"Hosts: {line!r} has no host name after the @")
        if host == "localhost":
            host = line = "127.0.0.1"  # mlx.launch runs 127.0.0.1 without ssh
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            try:
                ip = resolve(host)
            except OSError:
                raise ConfigError(f"Hosts: cannot find the address of {host}; write its IP address "
                                  "(user@192.168.2.2) or upload a hostfile") from None
        entries.append({"ssh": line, "ips": [ip]})
    return entries


def check_launch(mode: str, nproc: object, hostfile: str | None, hosts: str, batch_size: int,
                 cpus: int | None = None, resolve=resolve_ipv4) -> Launch:
    """The form's choice -> a Launch; ConfigError names the field (Processes, Hostfile, Hosts)."""
    if mode not in MODES:
        raise ConfigError(f"Run on: choose one of {', '.join(MODES)}")
    if mode == MODES[1]:
        n = parse_nproc(nproc, cpus or os.cpu_count() or 1)
        launch = Launch(nproc=n if n > 1 else 0, world_size=n)
    elif mode == MODES[2]:
        if not hostfile:
            raise ConfigError("Hostfile: upload an mlx.launch hostfile (JSON) first")
        text = read_hostfile(hostfile)
        launch = Launch(hostfile_text=text, world_size=len(check_hostfile_data(json.loads(text))))
    elif mode == MODES[3]:
        entries = hosts_to_hostfile(hosts, resolve)
        launch = Launch(hostfile_text=json.dumps(entries, indent=1) + "\n", world_size=len(entries))
    else:
        return Launch()
    if batch_size % launch.world_size:
        field = "Processes" if launch.nproc else "Hostfile" if mode == MODES[2] else "Hosts"
        raise ConfigError(f"{field}: batch size {batch_size} must be divisible by the number of processes "
                          f"({launch.world_size}); each process takes an equal share of every batch")
    return launch


def save_launch(run_dir: Path, launch: Launch) -> list[str]:
    """Write the choice into the run folder; returns the CLI arguments that launch it."""
    run_dir = Path(run_dir)
    if launch.hostfile_text is not None:
        (run_dir / HOSTFILE).write_text(launch.hostfile_text, encoding="utf-8")
        record = {"hosts": HOSTFILE}
    elif launch.nproc > 1:
        record = {"nproc": launch.nproc}
    else:
        return []
    (run_dir / LAUNCH).write_text(json.dumps(record) + "\n", encoding="utf-8")
    return launch_args(run_dir)


def launch_args(run_dir: Path) -> list[str]:
    """The CLI arguments a run folder was launched with (for Resume): --nproc N, --hosts FILE, or none."""
    try:
        record = json.loads((Path(run_dir) / LAUNCH).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if record.get("hosts"):
        return ["--hosts", str(Path(run_dir).resolve() / record["hosts"])]
    if int(record.get("nproc", 0)) > 1:
        return ["--nproc", str(int(record["nproc"]))]
    return []


def preview_args(mode: str, nproc: object, out: str = "runs/<name>") -> list[str]:
    """The launch part of the command preview (not checked: Start does that)."""
    if mode == MODES[1]:
        try:
            n = int(nproc)
        except (TypeError, ValueError):
            n = 0
        return ["--nproc", str(n)] if n != 1 else []
    if mode in MODES[2:]:
        return ["--hosts", f"{out}/{HOSTFILE}"]
    return []
