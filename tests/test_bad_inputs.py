"""The bad-input table: each bad flag, config file, dataset, model folder or adapter gets one clear error (exit
code 2 on the CLI, no traceback), and no file of an existing run or adapter changes."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny
from runhelp import cli, cli_in_process, hash_tree

from lora_app import trainer
from lora_app.adapters import load_adapter
from lora_app.config import DataConfig, RunConfig
from lora_app.data import load_data
from lora_app.models import load_model
from lora_app.user_errors import USER_ERRORS


@dataclass
class Kit:
    run: Path  # a finished run: config, events, adapters/, checkpoints/
    adapter: Path  # a copy of its adapter folder
    model: Path
    data: Path
    bad: Path  # the broken inputs
    other_model: Path  # same family, different hidden size
    hashes: dict


def break_model(kit_bad: Path, model: Path, name: str, fix) -> Path:
    folder = kit_bad / name
    shutil.copytree(model, folder)
    fix(folder)
    return folder


def make_bad_inputs(bad: Path, model: Path, adapter: Path) -> None:
    break_model(bad, model, "no-config", lambda f: (f / "config.json").unlink())
    break_model(bad, model, "bad-config", lambda f: (f / "config.json").write_text("{not json"))
    break_model(bad, model, "no-weights", lambda f: (f / "model.safetensors").unlink())
    break_model(bad, model, "torn-weights", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:1000]))
    (bad / "a-file.txt").write_text("x")
    (bad / "bad.yaml").write_text("iters: [1, 2\n")
    (bad / "unknown.yaml").write_text("iters: 5\nlearnin_rate: 0.1\n")
    (bad / "list.yaml").write_text("- iters\n- 5\n")
    (bad / "bad-type.json").write_text('{"save_every": "often"}')
    for name, text in {"badjson": '{"text": "ok"}\n{"text": \n', "nofields": '{"foo": 1}\n{"foo": 2}\n',
                       "empty": "", "few": '{"text": "the cat"}\n'}.items():
        (bad / f"data-{name}").mkdir()
        (bad / f"data-{name}" / "train.jsonl").write_text(text)
    for name, fix in {"rank": lambda c: c["lora_parameters"].update(rank=4), "noconfig": None,
                      "badconfig": "{oops", "torn": b"\x00\x01"}.items():
        folder = bad / f"adapter-{name}"
        shutil.copytree(adapter, folder)
        edit_adapter(folder, fix)


def edit_adapter(folder: Path, fix) -> None:
    config = folder / "adapter_config.json"
    if fix is None:
        config.unlink()
    elif isinstance(fix, str):
        config.write_text(fix)
    elif isinstance(fix, bytes):
        (folder / "adapters.safetensors").write_bytes(fix)
    else:
        data = json.loads(config.read_text())
        fix(data)
        config.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def kit(tiny_model: Path, text_data: Path, tmp_path_factory) -> Kit:
    root = tmp_path_factory.mktemp("bad-inputs")
    run = root / "existing-run"
    cfg = RunConfig.from_flat({"model": str(tiny_model), "data": str(text_data), "iters": 2, "batch_size": 2,
                               "max_seq_length": 64, "steps_per_eval": 0, "save_every": 1})
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_flat()))
    assert trainer.run(run, cfg).status == "done"
    adapter = shutil.copytree(run / "adapters", root / "adapter")
    other = tiny.build_tiny_model(root / "other-model", hidden=32)
    (root / "bad").mkdir()
    make_bad_inputs(root / "bad", tiny_model, adapter)
    return Kit(run, adapter, tiny_model, text_data, root / "bad", other,
               {"run": hash_tree(run), "adapter": hash_tree(adapter)})


def assert_nothing_changed(kit: Kit) -> None:
    assert hash_tree(kit.run) == kit.hashes["run"], "a file of the existing run changed"
    assert hash_tree(kit.adapter) == kit.hashes["adapter"], "a file of the adapter changed"


def train(k: Kit, *flags: str, out: str = "new-run") -> list[str]:
    return ["train", "--model", str(k.model), "--data", str(k.data), "--out", str(k.bad.parent / "out" / out),
            "--iters", "2", "--batch-size", "2", "--steps-per-eval", "0", *flags]


# (id, CLI arguments, text the one-line message must contain)
CLI_CASES = [
    ("no-out", lambda k: ["train", "--rank", "4"], "--out RUN_DIR is required"),
    ("out-is-a-run", lambda k: train(k, out="x")[:-8] + ["--out", str(k.run)], "already exists; use --resume"),
    ("out-is-a-file", lambda k: train(k)[:-7] + [str(k.bad / "a-file.txt")], "exists and is not a folder"),
    ("resume-not-a-run", lambda k: ["train", "--resume", str(k.bad)], "not a run folder"),
    ("resume-changes-rank", lambda k: ["train", "--resume", str(k.run), "--rank", "4"], "--rank cannot change"),
    ("lr-not-a-number", lambda k: train(k, "--learning-rate", "abc"), "learning_rate: expected float"),
    ("lr-infinite", lambda k: train(k, "--learning-rate", "inf"), "learning_rate must be a finite number"),
    ("lr-zero", lambda k: train(k, "--learning-rate", "0"), "learning_rate must be greater than 0"),
    ("rank-zero", lambda k: train(k, "--rank", "0"), "rank must be at least 1"),
    ("dropout-one", lambda k: train(k, "--dropout", "1"), "dropout must be in [0, 1)"),
    ("iters-fraction", lambda k: train(k, "--iters", "2.5"), "iters: expected int"),
    ("batch-size-zero", lambda k: train(k, "--batch-size", "0"), "batch_size must be at least 1"),
    ("optimizer-sgd", lambda k: train(k, "--optimizer", "sgd"), "optimizer must be adam or adamw"),
    ("layers-garbage", lambda k: train(k, "--layers", "first:2"), "layers must be all, last:N"),
    ("layers-outside", lambda k: train(k, "--layers", "0-7"), "outside the model, which has blocks 0-1"),
    ("module-unknown", lambda k: train(k, "--modules", "qq_proj"), "module 'qq_proj' not found"),
    ("config-missing", lambda k: train(k, "--config", str(k.bad / "nope.yaml")), "config file not found"),
    ("config-bad-yaml", lambda k: train(k, "--config", str(k.bad / "bad.yaml")), "not valid YAML: expected ',' or ']'"),
    ("config-unknown-key", lambda k: train(k, "--config", str(k.bad / "unknown.yaml")), "unknown setting(s): learnin"),
    ("config-a-list", lambda k: train(k, "--config", str(k.bad / "list.yaml")), "expected a mapping of settings"),
    ("config-bad-type", lambda k: train(k, "--config", str(k.bad / "bad-type.json")), "save_every: expected int"),
    ("model-missing", lambda k: train(k, "--model", str(k.bad / "nope")), "model folder not found"),
    ("model-a-file", lambda k: train(k, "--model", str(k.bad / "a-file.txt")), "model path is not a folder"),
    ("model-no-config", lambda k: train(k, "--model", str(k.bad / "no-config")), "no config.json"),
    ("model-bad-config", lambda k: train(k, "--model", str(k.bad / "bad-config")), "config.json: not valid JSON"),
    ("model-no-weights", lambda k: train(k, "--model", str(k.bad / "no-weights")), "no *.safetensors"),
    ("data-missing", lambda k: train(k, "--data", str(k.bad / "nope")), "no such file or folder"),
    ("data-few-rows", lambda k: train(k, "--data", str(k.bad / "data-few")), "fewer than the batch size"),
    ("stop-idle-run", lambda k: ["stop", str(k.run)], "no training process is running"),
    ("probe-tokens-negative", lambda k: train(k, "--probe-max-tokens", "-5"), "probe_max_tokens must be at least 1"),
    ("probe-tokens-huge", lambda k: train(k, "--probe-max-tokens", "100000"), "probe_max_tokens must be at most 4096"),
    ("iters-1e30", lambda k: train(k, "--iters", "1e30"), "iters must be at most 10000000 (got 1e+30)"),
    ("epochs-1e30", lambda k: train(k, "--epochs", "1e30"), "epochs must be at most 100000 (got 1e+30)"),
    ("seed-negative", lambda k: train(k, "--seed", "-1"), "seed must not be negative (got -1)"),
    ("rank-huge", lambda k: train(k, "--rank", "100000"), "rank must be at most 4096 (got 100000)"),
    ("layers-huge-range", lambda k: train(k, "--layers", "0-20000000"), "layers: block numbers must be at most"),
    ("max-seq-length-huge", lambda k: train(k, "--max-seq-length", "10000000"), "max_seq_length must be at most"),
    ("val-batches-negative", lambda k: train(k, "--val-batches", "-5"), "val_batches must be at least -1 (got -5)"),
    ("export-peft-torn", lambda k: ["export", "--adapter", str(k.bad / "adapter-torn"), "--format", "peft", "--out",
                                    str(k.bad.parent / "out" / "peft-torn")], "adapters.safetensors: cannot be read"),
    # An mlx.launch hostfile (issue 23): keys mlx.launch acts on but this app does not check are refused.
    ("hosts-envs", lambda k: (k.bad / "hosts-envs.json").write_text(
        '{"envs": ["PYTHONPATH=/tmp/x"], "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]}')
     and train(k, "--hosts", str(k.bad / "hosts-envs.json")), 'the top level has "envs", which this app does not'),
    ("hosts-ssh-option", lambda k: (k.bad / "hosts-ssh.json").write_text(
        '[{"ssh": "-oProxyCommand=touch /tmp/x", "ips": ["10.0.0.1"]}]')
     and train(k, "--hosts", str(k.bad / "hosts-ssh.json")), 'entry 1: "ssh" "-oProxyCommand=touch /tmp/x" is not'),
    ("hosts-bad-ip", lambda k: (k.bad / "hosts-ip.json").write_text('[{"ssh": "mac1", "ips": ["10.0.0.300"]}]')
     and train(k, "--hosts", str(k.bad / "hosts-ip.json")), 'entry 1: "ips" "10.0.0.300" is not an IP address'),
    # Datasets past the parsers' limits (issue 23): one bad row named by file and line, not a RecursionError/csv.Error.
    ("data-nested-jsonl", lambda k: train(k, "--data", str(bad_dataset(k, "nested", "train.jsonl", '{"text": "a b"}\n'
     * 4 + "[" * 100_000 + "]" * 100_000 + "\n"))), "train.jsonl: line 5: nested too deeply (more than 100 levels"),
    ("data-nested-json", lambda k: train(k, "--data", str(bad_dataset(k, "nested-json", "train.json", "[" * 100_000
     + "]" * 100_000))), "train.json: cannot be read: nested too deeply"),
    ("data-csv-huge-field", lambda k: train(k, "--data", str(bad_dataset(k, "huge-field", "train.csv", "text\n"
     + "a b\n" * 4 + "x" * 9_000_000 + "\n"))), "train.csv: line 6: a field is longer than 8,388,608 characters"),
    # A resume with nothing it can resume from (issue 23) stops, and touches nothing of the run.
    ("resume-torn-checkpoints", lambda k: ["train", "--resume", str(broken_run(k, "torn-checkpoints", b"\0" * 10))],
     "none of its 2 checkpoint(s) can be read (step_0000002: "),
    ("resume-nan-checkpoints", lambda k: ["train", "--resume", str(broken_run(k, "nan-checkpoints", None))],
     "step_0000001: its adapter weights are not finite (NaN or inf)); nothing was changed"),
]


# Each case runs in-process through the CLI's main(argv); these few also as a real `python -m lora_app` process
# (its start-up, the OpenBLAS re-exec, the exit code the shell sees): one of each kind of check.
AS_A_PROCESS = {"no-out", "config-bad-yaml", "module-unknown", "resume-torn-checkpoints", "export-peft-torn"}


@pytest.fixture
def run_cli(engine_env, capfd, monkeypatch):
    """cli(args) as a process (process=True) or in-process: the same CompletedProcess either way."""
    return lambda args, process=False: (cli(args, engine_env) if process
                                        else cli_in_process(args, capfd, monkeypatch))


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_rejects_bad_input(case, kit: Kit, run_cli) -> None:
    name, args, expected = case
    result = run_cli([str(kit.bad.parent / "out" / name) if a.endswith("/new-run") else a for a in args(kit)],
                     process=name in AS_A_PROCESS)
    assert result.returncode == 2, (result.stdout[-500:], result.stderr[-1500:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert_nothing_changed(kit)


@pytest.mark.slow
def test_cli_adapter_for_another_base_model(kit: Kit, run_cli) -> None:
    result = run_cli(["generate", "--model", str(kit.other_model), "--adapter", str(kit.adapter), "--prompt", "hi",
                      "--max-tokens", "2"], process=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
    assert result.stderr.startswith("error: ") and "adapter does not match this model" in result.stderr
    assert "made for" in result.stderr and "this model and rank need" in result.stderr
    assert_nothing_changed(kit)


# In-process: the same errors the UI shows (it calls the engine, not the CLI).
def user_error(call) -> str:
    with pytest.raises(USER_ERRORS) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("name, expected", [
    ("adapter-rank", "this model and rank need"), ("adapter-noconfig", "no adapter_config.json"),
    ("adapter-badconfig", "adapter_config.json: not valid JSON"), ("adapter-torn", "cannot be read"),
])
def test_broken_adapter_is_refused(name: str, expected: str, kit: Kit) -> None:
    model, _ = load_model(str(kit.model))
    assert expected in user_error(lambda: load_adapter(model, kit.bad / name))
    assert_nothing_changed(kit)


def test_torn_model_weights_are_refused(kit: Kit) -> None:
    message = user_error(lambda: load_model(str(kit.bad / "torn-weights")))
    assert "could not load model" in message and "torn-weights" in message


@pytest.mark.parametrize("name, expected", [
    ("badjson", "line 2: not valid JSON"), ("nofields", "cannot tell the format"), ("empty", "the file is empty"),
])
def test_bad_dataset_rows_are_refused(name: str, expected: str, kit: Kit) -> None:
    _, tokenizer = load_model(str(kit.model))
    message = user_error(lambda: load_data(DataConfig(data=str(kit.bad / f"data-{name}")), tokenizer, batch_size=1))
    assert expected in message and f"data-{name}" in message
    assert_nothing_changed(kit)


def test_export_of_a_truncated_adapter_writes_nothing(kit: Kit, run_cli, tmp_path: Path) -> None:
    from lora_app.adapters import export_adapter

    ours = shutil.copytree(kit.adapter, tmp_path / "ours-cut")
    (ours / "adapters.safetensors").write_bytes((kit.adapter / "adapters.safetensors").read_bytes()[:1000])
    peft = export_adapter(kit.adapter, "peft", tmp_path / "peft-cut")
    (peft / "adapter_model.safetensors").write_bytes((peft / "adapter_model.safetensors").read_bytes()[:1000])
    for folder, fmt, expected in [(ours, "peft", "ours-cut/adapters.safetensors: cannot be read"),
                                  (ours, "fused", "ours-cut/adapters.safetensors: cannot be read"),
                                  (peft, "fused", "peft-cut/adapter_model.safetensors: cannot be read")]:
        out = tmp_path / f"out-{folder.name}-{fmt}"
        result = run_cli(["export", "--adapter", str(folder), "--format", fmt, "--model", str(kit.model),
                          "--out", str(out)])
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))  # nor a half-written temporary
    assert_nothing_changed(kit)


def test_page_refuses_a_huge_layer_range_before_building_it() -> None:
    import time

    from lora_app.lora import LoraError, parse_layers
    from lora_app.ui.estimates import adapter_summary
    from lora_app.ui.settings import range_from_layers

    info = {"num_blocks": 2, "total_params": 1000, "linear_modules": ["self_attn.q_proj"],
            "module_shapes": {"self_attn.q_proj": [64, 64]}}
    start = time.perf_counter()
    with pytest.raises(LoraError, match=r"block\(s\) \[2, 3, 4, 5, 6\] and 19999994 more outside the model"):
        parse_layers("0-20000000", 2)
    summary = adapter_summary(info, "0-20000000", ["self_attn.q_proj"], 8)
    assert time.perf_counter() - start < 0.2
    assert summary.startswith("⚠️ layers=0-20000000: block(s) [2, 3, 4, 5, 6]") and len(summary) < 200
    assert adapter_summary(info, "all", ["self_attn.q_proj"], 1e30) == "⚠️ rank must be at most 4096 (got 1e+30)"
    # '²'.isdigit() is true but int('²') fails; int() refuses more than 4300 digits: both show the whole model.
    assert range_from_layers("last:²", 2) == range_from_layers("0-" + "9" * 5000, 2) == (0, 1)


def bad_dataset(k: Kit, name: str, file: str, text: str) -> Path:
    """A dataset folder in the kit's bad inputs, written when its case runs."""
    folder = k.bad / f"data-{name}"
    folder.mkdir(exist_ok=True)
    (folder / file).write_text(text)
    return folder


def broken_run(k: Kit, name: str, weights: bytes | None) -> Path:
    """A copy of the finished run whose every checkpoint's adapter file is `weights` (None: NaN weights)."""
    import mlx.core as mx

    from lora_app.checkpoints import checkpoint_dirs

    run = shutil.copytree(k.run, k.bad / name)
    for checkpoint in checkpoint_dirs(run):
        path = checkpoint / "adapters.safetensors"
        if weights is None:
            mx.save_safetensors(str(path), {n: v * float("nan") for n, v in mx.load(str(path)).items()})
        else:
            path.write_bytes(weights)
    return run
