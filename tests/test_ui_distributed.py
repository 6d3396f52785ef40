"""The Train step's data-parallel choice: validation, the hostfile written into the run folder, the
arguments Start and Resume pass to the CLI, the command preview and the stats line. No MLX, no app server."""

from __future__ import annotations

import json
import shlex
import socket
import warnings

import pytest
from runhelp import form_values

from lora_app import runs
from lora_app.__main__ import build_parser, check_new_run_dir
from lora_app.config import ConfigError, RunConfig
from lora_app.distributed import launch_command, read_hostfile
from lora_app.ui import launch, timeline, train_step
from lora_app.ui.context import Context
from lora_app.ui.settings import command_preview

HERE, N, FILE, LIST = launch.MODES


def no_dns(host: str) -> str:
    if host == "mac1.local":
        return "192.168.2.1"
    raise socket.gaierror(f"unknown host {host}")


def check(mode, nproc=2, hostfile=None, hosts="", batch_size=4, cpus=2):
    return launch.check_launch(mode, nproc, hostfile, hosts, batch_size, cpus=cpus, resolve=no_dns)


def test_this_process_and_one_process_launch_nothing(tmp_path):
    for choice in (check(HERE, nproc=99, hosts="bad host"), check(N, nproc=1)):
        assert choice.world_size == 1 and launch.save_launch(tmp_path, choice) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("nproc, message", [
    (0, "Processes: 0 is not between 2 and this machine's 2 CPU cores"),
    (3, "Processes: 3 is not between 2"),
    (-2, "Processes: -2 is not between 2"),
    (2.5, "Processes: 2.5 is not a whole number"),
    ("two", "Processes: 'two' is not a whole number"),
    (None, "Processes: None is not a whole number"),
])
def test_bad_process_counts_name_the_field(nproc, message):
    with pytest.raises(ConfigError, match="^" + message):
        check(N, nproc=nproc)


def test_batch_must_split_evenly_over_the_processes():
    with pytest.raises(ConfigError, match=r"Processes: batch size 3 must be divisible by .* \(2\)"):
        check(N, nproc=2, batch_size=3)
    with pytest.raises(ConfigError, match=r"Hosts: batch size 4 .* \(3\)"):
        check(LIST, hosts="127.0.0.1\n10.0.0.2\n10.0.0.3")


def test_processes_here_are_recorded_for_resume(tmp_path):
    choice = check(N, nproc=2)
    assert (choice.nproc, choice.world_size) == (2, 2)
    assert launch.save_launch(tmp_path, choice) == ["--nproc", "2"]
    assert launch.launch_args(tmp_path) == ["--nproc", "2"]
    assert not (tmp_path / "hosts.json").exists()


def test_a_list_of_hosts_becomes_an_mlx_launch_hostfile(tmp_path):
    choice = check(LIST, hosts="  localhost \n\nuser@10.0.0.2\nmac1.local\n", batch_size=6)
    assert choice.world_size == 3 and choice.nproc == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = launch.save_launch(run_dir, choice)
    hostfile = run_dir / "hosts.json"
    assert args == ["--hosts", str(hostfile.resolve())] == launch.launch_args(run_dir)
    assert json.loads(hostfile.read_text()) == [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                                {"ssh": "user@10.0.0.2", "ips": ["10.0.0.2"]},
                                                {"ssh": "mac1.local", "ips": ["192.168.2.1"]}]
    # mlx.launch's own parser reads it, and the ring backend gets an IP for every rank.
    from mlx._distributed_utils.common import Hostfile

    parsed = Hostfile.from_file(str(hostfile))
    assert [(h.ssh_hostname, h.ips) for h in parsed.hosts][1] == ("user@10.0.0.2", ["10.0.0.2"])
    assert read_hostfile(hostfile, "--hosts").to_json() == json.loads(hostfile.read_text())
    cmd = launch_command(run_dir, 0, args[1], resume=True)
    assert cmd[1:3] == ["--hostfile", args[1]] and cmd[-2:] == ["--resume", str(run_dir)]


@pytest.mark.parametrize("hosts, message", [
    ("", "Hosts: empty"),
    (" \n \n", "Hosts: empty"),
    ("mac1.local 192.168.2.1", "Hosts: 'mac1.local 192.168.2.1' contains a space"),
    ("user@", "Hosts: 'user@' has no host name"),
    ("nowhere.invalid", "Hosts: cannot find the address of nowhere.invalid"),
])
def test_bad_host_lists_name_the_field(hosts, message):
    with pytest.raises(ConfigError, match="^" + message):
        check(LIST, hosts=hosts)


def test_an_uploaded_hostfile_is_written_checked(tmp_path):
    """Only the checked fields reach the run folder (an "envs" key is refused: tests/test_hostfile_security.py)."""
    upload = tmp_path / "upload.json"
    data = {"backend": "ring", "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                         {"ssh": "mac1", "ips": ["10.0.0.1"]}]}
    upload.write_text(json.dumps(data, indent=4))
    choice = check(FILE, hostfile=str(upload))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert choice.world_size == 2 and launch.save_launch(run_dir, choice)[0] == "--hosts"
    assert (run_dir / "hosts.json").read_text() == json.dumps(data, indent=1) + "\n"
    assert json.loads((run_dir / "launch.json").read_text()) == {"hosts": "hosts.json"}


@pytest.mark.parametrize("content, message", [
    ("not json", "Hostfile: not valid JSON"),
    ('{"a": 1}', "Hostfile: expected a list of"),
    ("[]", "Hostfile: expected a list of"),
    ('[{"ips": ["10.0.0.1"]}]', r'Hostfile: expected .* \(entry 1 has no "ssh" host name\)'),
    ('[{"ssh": "a", "ips": "10.0.0.1"}]', r'Hostfile: expected .* \(entry 1: "ips" must be a list'),
    ('[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "mac2"}]', 'Hostfile: entry 2 \\(mac2\\) has no "ips"'),
])
def test_bad_hostfiles_name_the_field(content, message, tmp_path):
    upload = tmp_path / "hosts.json"
    upload.write_text(content)
    with pytest.raises(ConfigError, match="^" + message):
        check(FILE, hostfile=str(upload))


def test_a_hostfile_must_be_uploaded():
    with pytest.raises(ConfigError, match="^Hostfile: upload"):
        check(FILE, hostfile=None)


def test_the_cli_accepts_a_run_folder_the_app_prepared(tmp_path):
    for name in ("config.json", "train.log", "train.pid", "hosts.json", "launch.json"):
        (tmp_path / name).write_text("{}")
    assert check_new_run_dir(str(tmp_path)) == tmp_path


def test_command_preview_shows_the_launch():
    config = RunConfig()
    assert command_preview(config, extra=launch.preview_args(HERE, 2)).endswith("--out 'runs/<name>'")
    here = command_preview(config, extra=launch.preview_args(N, 2))
    assert here.endswith("--out 'runs/<name>' --nproc 2")
    assert build_parser().parse_args(shlex.split(here)[3:]).nproc == 2
    for mode in (FILE, LIST):
        assert command_preview(config, extra=launch.preview_args(mode, 2)).endswith(
            "--hosts 'runs/<name>/hosts.json'")
    assert train_step.preview_command(N, 3, **form_values()).endswith("--nproc 3")


def test_stats_name_the_processes_and_hosts():
    def running(**fields):
        return [{"event": "status", "time": 0, "status": "running", **fields}]

    assert timeline.processes_line(running(world_size=1, hosts=["me"])) == ""
    assert timeline.processes_line(running()) == ""  # a run from before hosts were recorded
    assert timeline.processes_line(running(world_size=2, hosts=["me", "me"])) == "**2 processes**: me ×2"
    assert timeline.processes_line(running(world_size=3, hosts=["a", "b", "b"])) == "**3 processes**: a, b ×2"
    stats = timeline.stats_markdown(runs.RunState(path=runs.Path("r")), running(world_size=2, hosts=["me", "me"]))
    assert stats.startswith("**2 processes**: me ×2 · **train loss**")


def test_start_refuses_bad_launch_input_without_a_run_folder(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(runs, "start_training", lambda run_dir, **kw: started.append((run_dir, kw)))
    ctx = Context(tmp_path / "runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request is a Python warning
        _, message = train_step.start(ctx, "x", N, 64, None, "", **form_values())
        assert message.startswith("⚠️ Processes: 64 is not between 2")
        _, message = train_step.start(ctx, "x", LIST, 2, None, "a b", **form_values())
        assert message.startswith("⚠️ Hosts:")
    assert not (tmp_path / "runs").exists() and not started

    name, message = train_step.start(ctx, "dp", N, 2, None, "", **form_values())
    assert name == "dp" and "on 2 processes" in message
    assert started == [(ctx.runs_dir / "dp", {"extra": ["--nproc", "2"]})]
    # Resume launches the run the way it was started.
    started.clear()
    assert train_step.resume_run(ctx, "dp")[0] == "dp"
    assert started == [(ctx.runs_dir / "dp", {"resume": True, "extra": ["--nproc", "2"]})]
