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
from ..distributed import HOSTFILE, MAX_HOSTS, Hosts, check_hostfile_data, is_ssh_target, read_hostfile, write_hostfile
from ..fileio import atomic_write_text

MODES = ("this process", "N processes on this machine", "machines from a hostfile", "a list of hosts")
LAUNCH = "launch.json"


@dataclass
class Launch:
    """A checked choice: nproc > 1 for processes here, or the checked hosts to write into the run folder."""

    nproc: int = 0
    hosts: Hosts | None = None
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


def hosts_to_hostfile(text: str, resolve=resolve_ipv4) -> list[dict]:
    """One host per line (`mac1.local`, `user@10.0.0.2`) -> hostfile entries; the first line is rank 0."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise ConfigError("Hosts: empty; write one host per line (mac1.local or user@10.0.0.2)")
    if len(lines) > MAX_HOSTS:  # before any name lookup
        raise ConfigError(f"Hosts: {len(lines)} hosts; at most {MAX_HOSTS}")
    entries = []
    for line in lines:
        if any(c.isspace() for c in line):
            raise ConfigError(f"Hosts: {line!r} contains a space; write one host per line")
        host = line.rsplit("@", 1)[-1]
        if not host:
            raise ConfigError(f"Hosts: {line!r} has no host name after the @")
        if not is_ssh_target(line):
            raise ConfigError(f'Hosts: {line!r} is not a host name (host or user@host: letters, digits, ".", '
                              '"-", "_", not starting with "-")')
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
        checked = read_hostfile(hostfile, "Hostfile", need_ips=True)
        launch = Launch(hosts=checked, world_size=len(checked.entries))
    elif mode == MODES[3]:
        checked = check_hostfile_data(hosts_to_hostfile(hosts, resolve), "Hosts", need_ips=True)
        launch = Launch(hosts=checked, world_size=len(checked.entries))
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
    if launch.hosts is not None:
        write_hostfile(run_dir, launch.hosts)  # the checked fields only, never the uploaded text
        record = {"hosts": HOSTFILE}
    elif launch.nproc > 1:
        record = {"nproc": launch.nproc}
    else:
        return []
    atomic_write_text(run_dir / LAUNCH, json.dumps(record) + "\n")
    return launch_args(run_dir)


def launch_args(run_dir: Path) -> list[str]:
    """The CLI arguments a run folder was launched with (for Resume): --nproc N, --hosts FILE, or none."""
    try:
        record = json.loads((Path(run_dir) / LAUNCH).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if record.get("hosts"):  # always our own copy: launch.json names no other path
        return ["--hosts", str(Path(run_dir).resolve() / HOSTFILE)]
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
