"""Issue 23, defect 1: an mlx.launch hostfile from the user runs nothing but the training command.

mlx.launch exports a hostfile's "envs" into every rank (a PYTHONPATH that points at a sitecustomize.py runs it)
and hands "ssh" names to ssh (one starting with "-" is an option). One checker keeps "ssh", "ips" and a known
backend; everything else is refused with a line naming the key and the entry, and mlx.launch reads only the
checked copy in the run folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from runhelp import form_values

from lora_app import runs
from lora_app.config import ConfigError
from lora_app.distributed import launch_command
from lora_app.ui import launch, train_step
from lora_app.ui.context import Context

HERE, N, FILE, LIST = launch.MODES
LOCAL = {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}
MAC = {"ssh": "mac1", "ips": ["10.0.0.1"]}

# (id, hostfile JSON, the start of the one-line error)
REFUSED = [
    ("envs-top-level", {"envs": ["PYTHONPATH=/tmp/evil"], "hosts": [LOCAL, MAC]},
     'Hostfile: the top level has "envs", which this app does not pass on (only "hosts" and "backend")'),
    ("envs-a-mapping", {"hosts": [LOCAL, MAC], "envs": {"PYTHONPATH": "/tmp/evil"}},
     'Hostfile: the top level has "envs"'),
    ("envs-in-an-entry", [LOCAL, {**MAC, "envs": ["PYTHONPATH=/tmp/evil"]}],
     'Hostfile: entry 2 has "envs", which this app does not pass on (only "ssh" and "ips")'),
    ("rdma-in-an-entry", [LOCAL, {**MAC, "rdma": [None, "x"]}], 'Hostfile: entry 2 has "rdma"'),
    ("unknown-top-level", {"hosts": [LOCAL, MAC], "python": "/tmp/evil"}, 'Hostfile: the top level has "python"'),
    ("ssh-option", [LOCAL, {"ssh": "-oProxyCommand=touch /tmp/pwned", "ips": ["10.0.0.1"]}],
     'Hostfile: entry 2: "ssh" "-oProxyCommand=touch /tmp/pwned" is not a host name'),
    ("ssh-option-as-user", [LOCAL, {"ssh": "-oProxyCommand=x@mac1", "ips": ["10.0.0.1"]}],
     'Hostfile: entry 2: "ssh"'),
    ("ssh-shell", [LOCAL, {"ssh": "mac1;reboot", "ips": ["10.0.0.1"]}], 'Hostfile: entry 2: "ssh"'),
    ("ssh-space", [LOCAL, {"ssh": "mac1 slots=9", "ips": ["10.0.0.1"]}], 'Hostfile: entry 2: "ssh"'),
    ("ssh-too-long", [LOCAL, {"ssh": "a" * 300, "ips": ["10.0.0.1"]}], 'Hostfile: entry 2: "ssh"'),
    ("ip-out-of-range", [LOCAL, {"ssh": "mac1", "ips": ["10.0.0.300"]}],
     'Hostfile: entry 2: "ips" "10.0.0.300" is not an IP address'),
    ("ip-shell", [LOCAL, {"ssh": "mac1", "ips": ["$(reboot)"]}], 'Hostfile: entry 2: "ips" "$(reboot)"'),
    ("ip-scope-text", [LOCAL, {"ssh": "mac1", "ips": ["fe80::1%$(reboot)"]}], 'Hostfile: entry 2: "ips"'),
    ("backend-unknown", {"backend": "evil", "hosts": [LOCAL, MAC]},
     'Hostfile: "backend" "evil" is not one this app launches (ring, mpi, nccl)'),
    ("backend-jaccl", {"backend": "jaccl", "hosts": [LOCAL, MAC]}, 'Hostfile: "backend" "jaccl"'),
    ("too-many-hosts", [LOCAL] * 1026, "Hostfile: 1026 hosts; at most 1024"),
]


def check_upload(tmp_path: Path, data: object, batch_size: int = 4) -> launch.Launch:
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps(data))
    return launch.check_launch(FILE, 2, str(upload), "", batch_size, cpus=2)


@pytest.mark.parametrize("data, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_the_ui_refuses_what_it_does_not_understand(data, message, tmp_path):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as info:
        check_upload(tmp_path, data, batch_size=1026 * 4)
    assert "\n" not in str(info.value)


def test_a_huge_hostfile_is_refused_before_it_is_parsed(tmp_path):
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps([LOCAL, MAC]) + " " * (1 << 20))
    with pytest.raises(ConfigError, match="^Hostfile: larger than 1024 KiB"):
        launch.check_launch(FILE, 2, str(upload), "", 4, cpus=2)


@pytest.mark.parametrize("line", ["-oProxyCommand=touch/tmp/pwned", "-x@mac1.local", "user@-oX", "mac1;reboot"])
def test_a_list_of_hosts_refuses_option_like_names(line):
    with pytest.raises(ConfigError, match="^Hosts: .* is not a host name"):
        launch.check_launch(LIST, 2, None, f"127.0.0.1\n{line}", 4, cpus=2, resolve=lambda host: "10.0.0.9")


def test_an_upload_is_written_normalized_and_resume_launches_that_copy(tmp_path):
    upload = tmp_path / "upload.json"
    upload.write_text('{\n  "backend":   "",\n   "hosts": [ {"ssh": " 127.0.0.1 ", "ips": ["127.0.0.1"]},\n'
                      '   {"ips": [" 10.0.0.1 "], "ssh": "user@mac1"} ] }\n\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = launch.save_launch(run_dir, launch.check_launch(FILE, 2, str(upload), "", 4, cpus=2))
    expected = [LOCAL, {"ssh": "user@mac1", "ips": ["10.0.0.1"]}]
    assert (run_dir / "hosts.json").read_text() == json.dumps(expected, indent=1) + "\n"
    # Resume: the CLI checks the run folder's copy again and hands mlx.launch that same file.
    assert args == launch.launch_args(run_dir) == ["--hosts", str(run_dir.resolve() / "hosts.json")]
    cmd = launch_command(run_dir, 0, args[1], resume=True)
    assert cmd[1:3] == ["--hostfile", str(run_dir / "hosts.json")] and cmd[-2:] == ["--resume", str(run_dir)]
    assert json.loads((run_dir / "hosts.json").read_text()) == expected


def test_a_known_backend_is_kept(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    launch.save_launch(run_dir, check_upload(tmp_path, {"backend": "ring", "hosts": [LOCAL, MAC]}))
    assert json.loads((run_dir / "hosts.json").read_text()) == {"backend": "ring", "hosts": [LOCAL, MAC]}
    # nccl connects through rank 0's IP only, so the others may leave "ips" out.
    launch.save_launch(run_dir, check_upload(tmp_path, {"backend": "nccl", "hosts": [LOCAL, {"ssh": "gpu1"}]}))
    assert json.loads((run_dir / "hosts.json").read_text()) == {
        "backend": "nccl", "hosts": [LOCAL, {"ssh": "gpu1", "ips": []}]}


def test_launch_json_cannot_point_resume_at_another_file(tmp_path):
    (tmp_path / "launch.json").write_text(json.dumps({"hosts": "../elsewhere.json"}))
    assert launch.launch_args(tmp_path) == ["--hosts", str(tmp_path.resolve() / "hosts.json")]


def test_the_cli_hands_mlx_launch_a_checked_copy_not_the_users_file(tmp_path):
    user_file = tmp_path / "mine.json"
    user_file.write_text(json.dumps([{"ssh": "mac1 ", "ips": ["10.0.0.1"]}, MAC], indent=8))
    run_dir = tmp_path / "run"
    cmd = launch_command(run_dir, 0, str(user_file), resume=False)
    assert cmd[1:3] == ["--hostfile", str(run_dir / "hosts.json")]
    assert (run_dir / "hosts.json").read_text() == json.dumps([MAC, MAC], indent=1) + "\n"
    # A change to the user's file after the check is not what runs.
    user_file.write_text(json.dumps({"envs": ["PYTHONPATH=/tmp/evil"], "hosts": [MAC]}))
    assert json.loads((run_dir / "hosts.json").read_text()) == [MAC, MAC]


def test_start_shows_the_refusal_and_makes_no_run_folder(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(runs, "start_training", lambda run_dir, **kw: started.append(run_dir))
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps({"envs": ["PYTHONPATH=/tmp/evil"], "hosts": [LOCAL, MAC]}))
    ctx = Context(tmp_path / "runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request is a Python warning
        _, message = train_step.start(ctx, "x", FILE, 2, str(upload), "", **form_values())
    assert message.startswith('⚠️ Hostfile: the top level has "envs"')
    assert not started and not (tmp_path / "runs").exists()


def evil_hostfile(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A hostfile that, if mlx.launch acted on it, would create `marker`."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "sitecustomize.py").write_text(f"import os\nopen({str(marker)!r}, 'w').close()\nos._exit(0)\n")
    data = {
        "envs": {"envs": [f"PYTHONPATH={evil}"], "hosts": [LOCAL]},
        "envs-in-an-entry": [{**LOCAL, "envs": [f"PYTHONPATH={evil}"]}],
        "ssh-option": [{"ssh": f"-oProxyCommand=touch {marker}", "ips": ["127.0.0.2"]}],
        "bad-ip": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1;touch"]}],
    }[kind]
    hostfile = tmp_path / "hosts-upload.json"
    hostfile.write_text(json.dumps(data))
    return hostfile, marker


@pytest.mark.parametrize("kind, message", [
    ("envs", '"envs", which this app does not pass on'),
    ("envs-in-an-entry", 'entry 1 has "envs"'),
    ("ssh-option", 'entry 1: "ssh" "-oProxyCommand='),
    ("bad-ip", 'entry 1: "ips" "127.0.0.1;touch" is not an IP address'),
])
def test_the_cli_refuses_it_with_one_line_and_no_run_folder(kind, message, tiny_model, text_data, engine_env,
                                                            tmp_path):
    hostfile, marker = evil_hostfile(tmp_path, kind)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "lora_app", "train", "--model", str(tiny_model), "--data",
                             str(text_data), "--iters", "2", "--batch-size", "2", "--hosts", str(hostfile),
                             "--out", str(out)], env=engine_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout + result.stderr)[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --hosts {hostfile}: ") and message in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())  # at most the empty folder the CLI locks; nothing in it
