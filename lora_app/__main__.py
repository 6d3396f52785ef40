"""The CLI: `python -m lora_app train|generate|eval|inspect|export|push|setup-gguf|download|demo-model|demo-data|
stop|pause|runs`.

The same engine the app uses. Bad input gets one clear line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from . import run_ahead, runs
from .config import SECTIONS, ConfigError, RunConfig, TrainConfig, field_help, load_config_file

if TYPE_CHECKING:
    from .hub import Progress

USAGE_ERROR = 2
PREPARED_FILES = {"config.json", "train.log", "train.pid", "control", "hosts.json", "launch.json"}  # app's launch


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# ---- argument parsing --------------------------------------------------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (--learning-rate ...); defaults None, so only given flags override."""
    helps = field_help()
    for section in SECTIONS:
        for f in fields(section):
            flag = "--" + f.name.replace("_", "-")
            kind = str(f.type)
            if kind.startswith("bool"):
                parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                    help=helps[f.name])
            elif kind.startswith("dict"):
                parser.add_argument(flag, dest=f.name, default=None, type=parse_mapping,
                                    help=helps[f.name] + " Form: key=column,key=column.")
            else:
                parser.add_argument(flag, dest=f.name, default=None, help=helps[f.name])
    parser.add_argument("--modules-all", dest="modules", action="store_const", const=None, help=argparse.SUPPRESS)


def parse_mapping(text: str) -> dict[str, str]:
    pairs = [p for p in text.split(",") if p.strip()]
    if not all("=" in p for p in pairs):
        raise argparse.ArgumentTypeError(f"expected key=column pairs separated by commas, got {text!r}")
    return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_app", description="LoRA fine-tuning with MLX.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="Train a LoRA adapter; the run folder records everything.")
    train.add_argument("--config", help="YAML/JSON config file (ours or mlx_lm.lora's); flags override it.")
    train.add_argument("--out", help="Run folder to create (must not exist or be empty).")
    train.add_argument("--resume", metavar="RUN_DIR", help="Continue a run from its newest checkpoint.")
    train.add_argument("--nproc", type=int, default=0, help="Data-parallel processes on this machine.")
    train.add_argument("--hosts", help="mlx.launch hostfile (JSON) for data-parallel training over machines.")
    train.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # a rank started by mlx.launch
    train.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the run's lock, taken by the app
    add_config_flags(train)

    gen = sub.add_parser("generate", help="Generate from a model, optionally with an adapter.")
    gen.add_argument("--model", required=True)
    gen.add_argument("--adapter", help="Adapter folder (ours, mlx-lm's or PEFT).")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--no-chat", action="store_true", help="Do not apply the chat template.")

    ev = sub.add_parser("eval", help="Exact-match accuracy and loss on DATA/test.jsonl.")
    ev.add_argument("--model", required=True)
    ev.add_argument("--adapter")
    ev.add_argument("--data", required=True)
    ev.add_argument("--limit", type=int)

    ins = sub.add_parser("inspect", help="Describe a model as JSON (blocks, linear modules, quantization).")
    ins.add_argument("--model", required=True)

    exp = sub.add_parser(
        "export", help="Export an adapter: a fused MLX model (LM Studio), a GGUF + Modelfile (Ollama), or PEFT.",
        description="Write the adapter for other tools into a new folder, then check what was written (check.json): "
                    "mlx = a fused model folder (LM Studio, mlx-lm); gguf = a GGUF from llama.cpp's converter plus an "
                    "Ollama Modelfile (run `setup-gguf` once first), or for gemma2 and mixtral the adapter plus a "
                    "Modelfile whose ADAPTER line Ollama converts; peft = a Hugging Face PEFT adapter.")
    exp.add_argument("--adapter", required=True)
    exp.add_argument("--format", choices=["mlx", "gguf", "peft", "fused"], required=True,
                     help="fused is the old name of mlx.")
    exp.add_argument("--out", required=True)
    exp.add_argument("--model", help="Base model (default: the one named in the adapter config).")
    exp.add_argument("--dequantize", action="store_true", help="mlx: write float weights.")
    exp.add_argument("--quantize", type=int, choices=[4, 8],
                     help="mlx: re-quantize the fused weights to 4 or 8 bits (mlx-lm's quantization); gguf: 8 = Q8_0.")
    exp.add_argument("--ollama-base", metavar="NAME",
                     help="gguf for a family Ollama imports adapters of (gemma2, mixtral), where an adapter and a "
                          "Modelfile are written instead of a GGUF: the Modelfile's FROM, the base model as Ollama "
                          "names it (e.g. gemma2:2b) or a GGUF file of it; without it, FROM is a placeholder to "
                          "replace.")
    exp.add_argument("--to-lmstudio", action="store_true",
                     help="mlx on macOS: also copy the folder into LM Studio's models folder (~/.lmstudio/models).")

    push = sub.add_parser(
        "push", help="Upload an adapter (or its PEFT / fused export) with a model card to the Hugging Face Hub.",
        epilog="The token comes from the environment variable HF_TOKEN or a saved `hf auth login`, never from the "
               "command line. HF_ENDPOINT names another hub.")
    push.add_argument("--adapter", required=True, help="Adapter folder (a run's adapters/ or best/, or any).")
    push.add_argument("--repo", required=True, help="Hub repo id, ORG/NAME (created if missing).")
    push.add_argument("--private", action="store_true", help="Create the repo private.")
    push.add_argument("--format", choices=["adapter", "peft", "fused"], default="adapter",
                      help="adapter: the folder as it is (mlx-lm layout); peft: exported to PEFT first; fused: the "
                           "fused MLX model, as `export --format mlx` writes it.")
    push.add_argument("--model", help="Base model (default: the one named in the adapter config).")

    sub.add_parser("setup-gguf", help="Fetch llama.cpp's converter (pinned, hash-checked) and PyTorch for GGUF export.")

    dl = sub.add_parser(
        "download", help="Download a model from the Hugging Face hub into its cache (only the files it needs).",
        description="Download the files a model needs (config, tokenizer, model*.safetensors) into the Hugging Face "
                    "cache, where this app, mlx-lm and transformers find them; prints the snapshot folder.",
        epilog="A gated or private repo needs a token: set it in the environment variable HF_TOKEN (never on the "
               "command line), or log in once with `hf auth login`. HF_HUB_CACHE moves the cache; HF_ENDPOINT "
               "names another hub. SIGTERM or Ctrl-C cancels and deletes the partial files.")
    dl.add_argument("repo", help="Hub repo id, org/name (e.g. mlx-community/Qwen3-0.6B-4bit).")
    dl.add_argument("--revision", help="Branch, tag or commit (default: main).")
    dl.add_argument("--json", action="store_true",
                    help='One JSON object per line on stdout: progress {"done", "total", "rate", "eta", "files_done", '
                         '"files_total"}, then {"path": ...} (what the app reads).')

    from .serve import add_arguments as serve_arguments

    serve_arguments(sub.add_parser("serve", help="Serve a model and its adapters over an OpenAI-compatible API, "
                                                 "kept loaded (base: model id 'base')."))

    demo_model = sub.add_parser("demo-model", help="Build the offline demo model folder (SmolLM2-135M).")
    demo_model.add_argument("--out", required=True)
    demo_data = sub.add_parser("demo-data", help="Write the demo task dataset.")
    demo_data.add_argument("--out", required=True)
    demo_data.add_argument("--seed", type=int, default=0)

    pre = sub.add_parser("preview", help="The Data step's preview: the first rows token by token, statistics.")
    pre.add_argument("--model", required=True, help="Model whose tokenizer (and chat template) to use.")
    pre.add_argument("--data", required=True)
    pre.add_argument("--data-format", default="auto")
    pre.add_argument("--valid-fraction", type=float, default=0.1)
    pre.add_argument("--mask-prompt", action="store_true")
    pre.add_argument("--skip-bad-rows", action="store_true")
    pre.add_argument("--max-seq-length", type=int, default=2048)
    pre.add_argument("--batch-size", type=int, default=4)
    pre.add_argument("--objective", default="sft", choices=("sft", "dpo", "orpo"),
                     help="What the run trains on preference pairs: sft the chosen answers, dpo / orpo both.")
    pre.add_argument("--rows", type=int, default=3, help="Rows shown token by token (at most 20).")
    pre.add_argument("--json", action="store_true", help="Print JSON (what the app reads).")

    for name, text in (("stop", "Stop a run (saves the adapter)."), ("pause", "Pause a run (resume later).")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir")
    ls = sub.add_parser("runs", help="List the runs in a folder.")
    ls.add_argument("runs_dir", nargs="?", default="runs")
    return parser


# ---- commands ----------------------------------------------------------------------------------------------

def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    flat = load_config_file(args.config) if args.config else {}
    for section in SECTIONS:
        for f in fields(section):
            value = getattr(args, f.name, None)
            if value is not None:
                flat[f.name] = value
    return RunConfig.from_flat(flat)


def check_new_run_dir(out: str | None) -> Path:
    if not out:
        raise UserError("train: --out RUN_DIR is required (or --resume RUN_DIR)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder")
    if path.is_dir() and never_trained(path):
        (path / "events.jsonl").unlink(missing_ok=True)  # it holds only the failure of an earlier start
    # A folder prepared by runs.start_training (config.json, train.log, train.pid) counts as new.
    if path.is_dir() and ((path / "events.jsonl").exists() or set(os.listdir(path)) - PREPARED_FILES):
        raise UserError(f"--out {path}: a run folder with content already exists; use --resume {path} "
                        "to continue it, or choose a new folder")
    return path


def never_trained(path: Path) -> bool:
    """A run that ended with an error before its first step (a bad model path, say): nothing to lose."""
    state = runs.run_state(path)
    kinds = {e["event"] for e in runs.read_events(path)}
    leftovers = set(os.listdir(path)) - PREPARED_FILES - {"events.jsonl"}
    return state.status == "error" and not state.alive and not leftovers and not kinds & {"train", "checkpoint"}


def resume_overrides(args: argparse.Namespace) -> dict:
    """Training settings given with --resume (--iters, --learning-rate after a NaN, ...); the model, data and
    LoRA shape are fixed by the checkpoint."""
    given = {f.name: getattr(args, f.name) for section in SECTIONS for f in fields(section)
             if getattr(args, f.name, None) is not None}
    fixed = sorted(set(given) - {f.name for f in fields(TrainConfig)})
    if fixed or args.config:
        names = ", ".join("--" + n.replace("_", "-") for n in fixed) or "--config"
        raise UserError(f"--resume: {names} cannot change when resuming (only training settings such as "
                        "--iters or --learning-rate can); start a new run instead")
    return given


def hold_run_lock(run_dir: Path, args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The run folder's lock, held while training (none for a rank that mlx.launch started: the launching process
    holds it); RunError, before anything in the folder changes, when another trainer has it."""
    if args.launched:
        return contextlib.nullcontext()
    return runs.lock_run(run_dir, fd=args.lock_fd)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import save_config_json

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise UserError(f"--resume {run_dir}: not a run folder (no config.json)")
        overrides = resume_overrides(args)
        cfg = RunConfig.from_flat({**runs.read_config(run_dir), **overrides})
    else:
        overrides = {}
        cfg = run_config_from_args(args)
        if args.launched:  # rank 0 makes the folder (other ranks may be on machines that only read)
            run_dir = Path(args.out or "")
        else:
            run_dir = check_new_run_dir(args.out)
            run_dir.mkdir(parents=True, exist_ok=True)  # to be locked
    with hold_run_lock(run_dir, args):
        if overrides and (args.nproc > 1 or args.hosts):  # the launched ranks read config.json
            save_config_json(cfg, run_dir / "config.json")
        if (args.nproc > 1 or args.hosts) and not args.launched:
            from .distributed import launch

            return launch(run_dir, cfg, args.nproc, args.hosts, resume=bool(args.resume))
        return train_here(run_dir, cfg, bool(args.resume))


def train_here(run_dir: Path, cfg: RunConfig, resume: bool) -> int:
    """This process trains the run (alone, or as one rank of a data-parallel run); its exit code."""
    from .config import save_config_json
    from .distributed import world
    from .trainer import run

    if world()[0] == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config_json(cfg, run_dir / "config.json")
        runs.clear_control(run_dir)
    outcome = run(run_dir, cfg, resume=resume)
    if outcome.status == "error":
        print(f"error: {outcome.message}", file=sys.stderr)
        return USAGE_ERROR if outcome.user_error else 1
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import load_for_generation, stream_answer

    model, tokenizer = load_for_generation(args.model, args.adapter)
    for piece in stream_answer(model, tokenizer, args.prompt, args.max_tokens, args.temperature,
                               chat=not args.no_chat):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_task, format_report
    from .models import resolve_model

    result = evaluate_task(resolve_model(args.model), args.adapter, Path(args.data), limit=args.limit)
    print(format_report(result))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .models import inspect_path

    print(json.dumps(inspect_path(args.model).to_dict(), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .adapters.report import export_and_report

    return export_and_report(args)


def cmd_push(args: argparse.Namespace) -> int:
    from .adapters.push import push_and_report

    return push_and_report(args)


def cmd_setup_gguf(args: argparse.Namespace) -> int:
    from .adapters.gguf import setup

    print(f"ready: {setup(log=lambda m: print(m, file=sys.stderr, flush=True))}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Progress on stderr (or JSON lines on stdout), the snapshot folder on stdout. SIGTERM / SIGINT cancel: the
    partial files are deleted and the exit code is 128 + the signal's number."""
    import signal
    import threading

    from huggingface_hub.utils import logging as hub_logging

    from . import hub

    hub_logging.set_verbosity_error()  # its retry warnings would break the one-line error contract
    cancel, signals = threading.Event(), []

    def stop(signum: int, _frame: object) -> None:
        signals.append(signum)
        cancel.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    line = ProgressLine()
    show = (lambda p: print(json.dumps(p.to_json()), flush=True)) if args.json else line.show
    try:
        path = hub.download(args.repo, args.revision, on_progress=show, cancel=cancel)
    except hub.DownloadCancelled:
        line.end()
        print("download cancelled", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # A transfer stalled on a dead connection keeps a worker thread the interpreter would wait for at exit.
        os._exit(128 + (signals[0] if signals else signal.SIGTERM))
    finally:
        line.end()
    print(json.dumps({"path": str(path)}) if args.json else path, flush=True)
    return 0


class ProgressLine:
    """One carriage-return line on stderr: bytes, percent, rate, ETA, files."""

    def __init__(self) -> None:
        self.width = 0

    def show(self, p: Progress) -> None:
        from .hub import human_bytes

        share = p.done_bytes / p.total_bytes if p.total_bytes else 1.0
        eta = f"ETA {int(p.eta_s) // 60}:{int(p.eta_s) % 60:02d}" if p.eta_s is not None else "ETA -"
        text = (f"{human_bytes(p.done_bytes)} / {human_bytes(p.total_bytes)}  {share:4.0%}  "
                f"{human_bytes(p.rate_bytes_per_s)}/s  {eta}  {p.files_done}/{p.files_total} files")
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = max(self.width, len(text))

    def end(self) -> None:
        if self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.width = 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import serve

    try:
        return serve.main(args)
    except serve.ServeError as e:
        raise UserError(str(e)) from None


def cmd_demo_model(args: argparse.Namespace) -> int:
    from .demo import build_demo_model

    print(build_demo_model(Path(args.out)))
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo import write_demo_data

    print(write_demo_data(Path(args.out), seed=args.seed))
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    """The Data step's preview, in its own process (the app runs it): a big dataset's memory and time stay here."""
    from .data import format_statistics
    from .models import resolve_model
    from .probes import preview_report

    cfg = RunConfig.from_flat({"data": args.data, "data_format": args.data_format, "mask_prompt": args.mask_prompt,
                               "valid_fraction": args.valid_fraction, "skip_bad_rows": args.skip_bad_rows,
                               "max_seq_length": args.max_seq_length, "batch_size": args.batch_size,
                               "objective": args.objective})
    from transformers import AutoTokenizer  # the tokenizer alone: no model weights, no MLX

    model = resolve_model(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(f"{args.model}: cannot load its tokenizer ({(str(e) or repr(e)).splitlines()[0]})") from None
    report = preview_report(cfg.data, tokenizer, cfg.train.max_seq_length, cfg.train.batch_size,
                            n_rows=max(0, min(args.rows, 20)), objective=cfg.train.objective)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_statistics(report["statistics"]), *(f"- {n}" for n in report["notes"]), sep="\n")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    state = runs.run_state(Path(args.run_dir))
    if not state.active:
        raise UserError(f"{args.run_dir}: no training process is running (status: {state.status})")
    runs.request(Path(args.run_dir), args.command)
    print(f"{args.command} requested for {args.run_dir}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    for s in runs.list_runs(Path(args.runs_dir)):
        loss = f"{s.train_loss:.4f}" if s.train_loss is not None else "-"
        print(f"{s.name}\t{s.status}\tstep {s.step}/{s.total_steps}\tloss {loss}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "inspect": cmd_inspect,
            "export": cmd_export, "push": cmd_push, "setup-gguf": cmd_setup_gguf, "download": cmd_download,
            "demo-model": cmd_demo_model, "demo-data": cmd_demo_data,
            "preview": cmd_preview, "serve": cmd_serve, "stop": cmd_control, "pause": cmd_control, "runs": cmd_runs}


def reexec_with_openblas(argv: list[str]) -> None:
    """On Linux, MLX's CPU wheel links a reference BLAS; restart once with OpenBLAS preloaded (~8x faster)."""
    env = runs.engine_env()
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        os.execve(sys.executable, [sys.executable, "-m", "lora_app", *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "train":  # before anything starts MLX's GPU
        run_ahead.set_graph_size()
    if args.command in ("train", "generate", "eval", "export", "push", "demo-model", "serve"):
        reexec_with_openblas(argv)
    from .user_errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except (UserError, ConfigError, runs.RunError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
