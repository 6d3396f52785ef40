"""Engine-free UI logic: events -> frames, ETA, run list rows, config diff, command preview, YAML mapping."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lora_app import memory, runs
from lora_app.__main__ import build_parser, run_config_from_args
from lora_app.config import ConfigError, RunConfig, save_config_json
from lora_app.ui import cli, estimates, loss_plot, runlist, settings, timeline
from lora_app.ui.loss_plot import loss_svg, nice_ticks, points_in

ROOT = Path(__file__).resolve().parent.parent


def ev(kind: str, t: float = 0.0, **fields) -> dict:
    return {"event": kind, "time": t, **fields}


def test_loss_frame_keeps_last_value_per_step_after_resume():
    events = [ev("train", step=10, loss=3.0), ev("train", step=20, loss=2.5), ev("val", step=20, val_loss=2.7),
              ev("train", step=20, loss=2.4), ev("val", step=20, val_loss=2.6), ev("train", step=30, loss=2.0)]
    frame = timeline.loss_frame(events)
    assert list(frame.columns) == ["step", "loss", "series"]
    train = frame[frame.series == "train"]
    assert train.step.tolist() == [10, 20, 30] and train.loss.tolist() == [3.0, 2.4, 2.0]
    assert frame[frame.series == "valid"].loss.tolist() == [2.6]


def test_thin_keeps_the_shape_and_the_newest_point():
    events = [ev("train", step=s, loss=1 / s) for s in range(1, 1001)] + [
        ev("val", step=s, val_loss=2 / s) for s in range(100, 1001, 100)]
    frame = timeline.thin(timeline.loss_frame(events), 200)
    train = frame[frame.series == "train"]
    assert len(train) == 200 and train.step.iloc[0] == 1
    assert train.step.iloc[-50:].tolist() == list(range(951, 1001))  # the newest 50 all there
    assert train.step.iloc[:150].diff().dropna().between(5, 8).all()  # the older evenly spaced (949 / 149 = 6.4)
    assert (train.loss == 1 / train.step).all() and len(frame[frame.series == "valid"]) == 10  # values as read
    assert frame.step.is_monotonic_increasing
    short = timeline.loss_frame(events[:50])
    assert timeline.thin(short, 200).equals(short) and timeline.thin(timeline.loss_frame([]), 200).empty


def test_loss_svg_draws_each_point_inside_its_axes():
    import xml.etree.ElementTree as ET

    events = [ev("train", step=s, loss=4 - s / 100) for s in range(10, 301, 10)] + [
        ev("val", step=150, val_loss=2.9), ev("val", step=300, val_loss=1.7)]
    frame = timeline.loss_frame(events)
    svg = loss_svg(frame)
    expected = [(step, round(loss, 6), series) for step, loss, series in frame.itertuples(index=False)]
    assert sorted(points_in(svg)) == sorted(expected)
    root = ET.fromstring(svg)  # well-formed, so the page parses it as drawn
    paths = {p.get("data-series"): p for p in root.iter("{http://www.w3.org/2000/svg}path")}
    assert set(paths) == {"train", "valid"}
    # Every point in the plotting area, the first and last steps at its ends
    left, right = loss_plot.LEFT, loss_plot.WIDTH - loss_plot.RIGHT
    top, bottom = loss_plot.TOP, loss_plot.HEIGHT - loss_plot.BOTTOM
    xy = [tuple(map(float, point.split(",")[:2])) for path in paths.values()
          for point in path.get("data-points").split()]
    assert all(left <= x <= right and top <= y <= bottom for x, y in xy)
    assert min(x for x, _ in xy) == left and max(x for x, _ in xy) == right
    assert nice_ticks(1.0, 3.9) == [1.0, 2.0, 3.0, 4.0] and nice_ticks(20, 1060) == [0, 250, 500, 750, 1000, 1250]
    # A lone first point is drawn (a zero-length line with round caps: a dot); no points, a message; NaN, inf left out
    one = loss_svg(timeline.loss_frame(events[:1]))
    x, y = re.search(r'data-points="([\d.]+),([\d.]+),10,3.9"', one).groups()
    assert points_in(one) == [(10, 3.9, "train")] and f'd="M{x} {y} L{x} {y}"' in one
    assert "No loss reported yet" in loss_svg(timeline.loss_frame([])) and points_in(loss_svg(frame.iloc[:0])) == []
    gaps = frame.assign(loss=frame.loss.where(frame.step != 20).where(frame.step != 30, float("inf")))
    assert {s for s, _, _ in points_in(loss_svg(gaps))} == set(frame.step) - {20, 30}
    assert loss_plot.tick_labels([2.5, 3.0, 3.5]) == ["2.5", "3.0", "3.5"]
    assert loss_plot.tick_labels([1000.0, 2000.0]) == ["1,000", "2,000"]
    close = loss_plot.tick_labels(nice_ticks(2.30001, 2.30004))
    assert len(set(close)) == len(close) >= 4 and all(len(label) == 7 for label in close)  # 2.3000x


def test_duration_and_eta():
    assert [timeline.format_duration(s) for s in (None, 5, 125, 3725)] == ["-", "5s", "2m 05s", "1h 02m"]
    events = [ev("train", 100.0, step=10, loss=1), ev("train", 110.0, step=20, loss=1)]
    assert timeline.eta_seconds(events, 100) == pytest.approx(80.0)
    assert timeline.eta_seconds(events[:1], 100) is None
    assert [estimates.human_bytes(g * 1e9) for g in (0.0042, 0.5, 12.345)] == ["4.2 MB", "500.0 MB", "12.3 GB"]


def test_stats_show_peak_memory_in_mb_for_small_models():
    state = runs.RunState(path=Path("r"))
    assert "**peak memory** -" in timeline.stats_markdown(state, [])
    small = [ev("train", 1.0, step=10, loss=1.0, peak_memory_gb=0.0042)]
    assert "**peak memory** 4.2 MB" in timeline.stats_markdown(state, small)


def test_samples_timeline_has_base_first():
    events = [ev("sample", step=50, prompt="p1", answer="a50"), ev("sample", step=0, prompt="p1", answer="base"),
              ev("sample", step=0, prompt="p2", answer="b2"), ev("sample", step=50, prompt="p2", answer="c2")]
    frame = timeline.samples_frame(events)
    assert frame.columns.tolist() == ["step", "p1", "p2"]
    assert frame.values.tolist() == [["base", "base", "b2"], ["50", "a50", "c2"]]


def make_run(runs_dir: Path, name: str, events: list[dict], adapters=("adapters",), **overrides) -> Path:
    run_dir = runs.new_run_dir(runs_dir, name)
    save_config_json(RunConfig.from_flat({"model": "/m", "data": "/d", **overrides}), run_dir / "config.json")
    for e in events:
        runs.append_event(run_dir, e.pop("event"), **{k: v for k, v in e.items() if k != "time"})
    for kind in adapters:
        (run_dir / kind).mkdir()
        (run_dir / kind / "adapters.safetensors").write_bytes(b"x")
    return run_dir


def test_run_rows_and_adapter_choices(tmp_path):
    make_run(tmp_path, "a", [ev("status", status="starting", total_steps=40), ev("train", step=40, loss=1.5),
                             ev("val", step=40, val_loss=1.7), ev("best", step=40, val_loss=1.7),
                             ev("status", status="done")], adapters=("adapters", "best"), rank=4, alpha=8)
    frame = runlist.runs_frame(tmp_path)
    row = dict(zip(frame.columns, frame.values[0]))
    assert row["name"] == "a" and row["status"] == "done" and row["rank/alpha"] == "4/8.0"
    assert row["train loss"] == "1.5000" and row["best (step)"] == "1.7000 (40)" and row["adapters"] == "adapters best"
    assert row["targets"] == "q_proj,v_proj @ all"
    labels = dict(runlist.adapter_choices(tmp_path))
    assert {Path(v).name for v in labels.values()} == {"adapters", "best"}
    assert any("best (step 40, valid 1.7000)" in label for label in labels)


def test_compare_aligns_by_tokens_and_diffs_configs(tmp_path):
    events = [ev("train", step=10, loss=2.0, trained_tokens=100), ev("train", step=20, loss=1.0, trained_tokens=300),
              ev("val", step=15, val_loss=1.5)]
    curve = runlist.curve_points(events)
    assert curve[curve.series == "valid"].tokens.tolist() == [200.0]
    frame = runlist.compare_frame({"r1": curve, "r2": curve}, x="tokens", log_scale=True)
    assert set(frame.curve) == {"r1 train", "r1 valid", "r2 train", "r2 valid"}
    assert frame.loss.min() == pytest.approx(0.0) and "tokens" in frame.columns
    smoothed = runlist.smooth(curve[curve.series == "train"].loss, 0.5).tolist()
    assert smoothed == pytest.approx([2.0, 1.5])
    diff = runlist.config_diff({"r1": {"rank": 8, "alpha": 16, "iters": 10}, "r2": {"rank": 4, "alpha": 16}})
    assert diff.columns.tolist() == ["setting", "r1", "r2"]
    assert diff.values.tolist() == [["iters", "10", "200"], ["rank", "8", "4"]]


def form_values(**overrides) -> dict:
    values = settings.config_to_form(RunConfig())
    values.update(overrides)
    return values


def test_command_preview_parses_back_to_the_same_config():
    values = form_values(model="/models/my model", data="/data", rank=4, alpha=32, modules=["self_attn.k_proj",
                         "mlp.down_proj"], layers="last:2", iters=77, learning_rate=3e-4, mask_prompt=True,
                         probe_prompts="What is 2+2?\nName a colour", dequantize="yes")
    config = settings.form_to_config(values)
    command = settings.command_preview(config, out="runs/x")
    argv = __import__("shlex").split(command)[3:]
    assert argv[0] == "train" and argv[-2:] == ["--out", "runs/x"]
    parsed = run_config_from_args(build_parser().parse_args(argv))
    assert parsed == config


def test_form_errors_name_the_field():
    with pytest.raises(ConfigError, match="rank must be at least 1"):
        settings.form_to_config(form_values(rank=0))
    with pytest.raises(ConfigError, match="model: empty"):
        settings.form_to_config(form_values(model="  "))
    with pytest.raises(ConfigError, match="at most 5"):
        settings.form_to_config(form_values(probe_prompts="\n".join("abcdef")))


def test_yaml_import_maps_mlx_lm_keys(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({
        "model": "mlx-community/x", "train": True, "data": "data", "fine_tune_type": "lora", "num_layers": 4,
        "batch_size": 2, "iters": 300, "learning_rate": 2e-5, "steps_per_save": 50,
        "lora_parameters": {"rank": 16, "scale": 2.0, "dropout": 0.05, "keys": ["self_attn.q_proj", "mlp.up_proj"]},
        "lr_schedule": {"name": "cosine_decay", "arguments": [2e-5, 300, 0], "warmup": 10},
    }))
    values = settings.import_yaml(path, ["mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj"])
    assert values["rank"] == 16 and values["alpha"] == 32.0 and values["dropout"] == 0.05
    assert values["modules"] == ["mlp.up_proj", "self_attn.q_proj"] and values["layers"] == "last:4"
    assert values["save_every"] == 50 and values["warmup"] == 10 and values["lr_schedule"] == "cosine"
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 2\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown setting.*learning_rat"):
        settings.import_yaml(bad)


def test_yaml_export_round_trips_through_import(tmp_path):
    config = settings.form_to_config(form_values(model="/m", data="/d", rank=4, alpha=12, layers="last:3",
                                                 modules=["self_attn.q_proj", "mlp.down_proj"], warmup=5))
    path = tmp_path / "out.yaml"
    path.write_text(settings.export_yaml(config))
    assert yaml.safe_load(path.read_text())["lora_parameters"]["scale"] == 3.0
    back = settings.form_to_config(settings.import_yaml(path, ["mlp.down_proj", "self_attn.q_proj"]))
    assert sorted(back.lora.modules) == sorted(config.lora.modules)
    back.lora.modules = config.lora.modules
    assert back.lora == config.lora and back.train.warmup == 5 and back.train.iters == config.train.iters
    with pytest.raises(ConfigError, match="last N blocks"):
        settings.export_yaml(settings.form_to_config(form_values(layers="0-1")))


def test_block_range_and_layers_spec():
    assert settings.layers_from_range(0, 5, 6) == "all"
    assert settings.layers_from_range(2, 5, 6) == "last:4"
    assert settings.layers_from_range(1, 3, 6) == "1-3"
    assert settings.range_from_layers("last:4", 6) == (2, 5) and settings.range_from_layers("1-3", 6) == (1, 3)
    with pytest.raises(ConfigError, match="first block 4 is after last block 2"):
        settings.layers_from_range(4, 2, 6)


def test_adapter_summary_counts_real_shapes():
    info = {"num_blocks": 4, "total_params": 100_000, "linear_modules": ["self_attn.q_proj", "self_attn.v_proj"],
            "module_shapes": {"self_attn.q_proj": [64, 64], "self_attn.v_proj": [32, 64]}}
    text = estimates.adapter_summary(info, "last:2", ["self_attn.q_proj", "self_attn.v_proj"], 8)
    assert "3,584" in text and "3.584%" in text and "14.3 KB" in text and "2 block(s) × 2 module(s)" in text
    assert "not in this model" in estimates.adapter_summary(info, "all", ["mlp.up_proj"], 8)
    assert "outside the model" in estimates.adapter_summary(info, "0,7", ["self_attn.q_proj"], 8)


def test_adapter_summary_estimates_training_memory(monkeypatch):
    monkeypatch.setattr(estimates.engine, "machine", lambda: ("cpu", int(23.6e9)))
    info = {"num_blocks": 30, "total_params": 134_515_008, "hidden_size": 576, "vocab_size": 49152,
            "dtype": "float16", "quantization": {"bits": 4, "group_size": 32},
            "linear_modules": ["self_attn.q_proj"], "module_shapes": {"self_attn.q_proj": [576, 576]}}
    trainable = 30 * 8 * (576 + 576)
    full = memory.estimate_training_memory(info, trainable, 4, 512)
    ckpt = memory.estimate_training_memory(info, trainable, 4, 512, grad_checkpoint=True)
    text = estimates.adapter_summary(info, "all", ["self_attn.q_proj"], 8, 4, 512, False)
    assert f"{trainable:,}" in text and "batch 4 × 512 tokens" in text and "upper bound" in text
    assert f"about {estimates.human_bytes(full['total'])} (weights" in text
    longer = estimates.adapter_summary(info, "all", ["self_attn.q_proj"], 8, 4, 2048, False)
    assert estimates.human_bytes(memory.estimate_training_memory(info, trainable, 4, 2048)["total"]) in longer
    with_ckpt = estimates.adapter_summary(info, "all", ["self_attn.q_proj"], 8, 4, 512, True)
    assert f"about {estimates.human_bytes(ckpt['total'])}" in with_ckpt
    assert "set batch size" in estimates.adapter_summary(info, "all", ["self_attn.q_proj"], 8, 0, 512, False)
    assert "⚠️" not in text
    short_rows = estimates.adapter_summary(info, "all", ["self_attn.q_proj"], 8, 4, 2048, False, 100)
    assert "batch 4 × 128 tokens" in short_rows and "longest row has 100 tokens" in short_rows
    huge = estimates.adapter_summary(info, "all", ["self_attn.q_proj"], 8, 512, 32768, False)
    assert "\n\n⚠️ **Training memory**" in huge and "more than the 23.6 GB" in huge
    # 512 rows are too many for any one change: checkpointing with one row at a shorter length
    shorter = re.search(r"with gradient checkpointing, batch size 1 and max sequence length (\d+) it would be", huge)
    assert shorter and int(shorter[1]) < 32768, huge
    monkeypatch.setattr(estimates.engine, "machine", lambda: ("cpu", int(0.05e9)))  # less than the weights
    hopeless = estimates.adapter_summary(info, "all", ["self_attn.q_proj"], 8, 4, 512, False)
    assert "none of the changes the app tries fits it" in hopeless
    monkeypatch.setattr(estimates.engine, "machine", lambda: ("cpu", int(23.6e9)))
    big = estimates.adapter_summary(info, "all", ["self_attn.q_proj"], 8, 8, 2048, False)
    assert "⚠️" in big and "with gradient checkpointing it would be about" in big


def test_app_refuses_to_expose_without_auth():
    for argv, msg in ((["--share"], "--share makes the page reachable"),
                      (["--host", "0.0.0.0"], "--host 0.0.0.0 makes the page reachable"),
                      (["--host", "0.0.0.0", "--auth", "user"], "--auth must be user:password")):
        with pytest.raises(SystemExit, match=msg):
            cli.check_exposure(cli.parse_args(argv))
    assert cli.check_exposure(cli.parse_args(["--host", "0.0.0.0", "--auth", "u:p"])) == ("u", "p")
    assert cli.check_exposure(cli.parse_args([])) is None
    done = subprocess.run([sys.executable, "app.py", "--share", "--no-browser"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "add --auth user:password" in done.stderr and "Traceback" not in done.stderr


def test_log_tail_and_event_cache(tmp_path):
    (tmp_path / "train.log").write_text("".join(f"line {i}\n" for i in range(100)))
    assert timeline.log_tail(tmp_path, lines=3) == "line 97\nline 98\nline 99"
    cache = timeline.EventCache()
    runs.append_event(tmp_path, "train", step=1, loss=1.0)
    assert len(cache.events(tmp_path)) == 1
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "train", "step": 2, "loss": 0.5})[:10])  # a torn line waits
    assert len(cache.events(tmp_path)) == 1


def test_calm_queue_slows_gradios_idle_polling(tmp_path):
    """Gradio's queue loop wakes every 1 ms when idle; the app slows it (a gradio upgrade that renames the
    attributes fails here rather than silently bringing back the idle CPU use)."""
    from lora_app.ui.blocks import build_app

    demo = build_app(tmp_path / "runs").queue()
    assert demo._queue.sleep_when_free < 0.05
    cli.calm_queue(demo)
    assert demo._queue.sleep_when_free == 0.05 and demo._queue.progress_update_sleep_when_free == 0.1


def test_poll_sends_only_what_changed(tmp_path):
    """A poll answers gr.skip() for everything until the run folder changes, and for the sample table while its
    probes are the ones the page shows (bench/ui_overhead.py --browser: the page's cost)."""
    import gradio as gr

    from lora_app.ui import train_step
    from lora_app.ui.context import Context

    skip = type(gr.skip())
    ctx = Context(tmp_path, None)
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.json").write_text('{"iters": 10}')
    runs.append_event(run, "sample", step=0, prompt="p", answer="a")
    assert all(isinstance(x, skip) for x in train_step.poll(ctx, "", None)[:6])  # no run shown
    first = train_step.poll(ctx, "r1", None)
    assert list(first[3].columns) == ["step", "p"]
    assert all(isinstance(x, skip) for x in train_step.poll(ctx, "r1", first[6])[:6])
    runs.append_event(run, "train", step=1, loss=2.0)
    again = train_step.poll(ctx, "r1", first[6])
    assert isinstance(again[3], skip) and points_in(again[2]) == [(1, 2.0, "train")] and again[6] != first[6]


def test_follow_pushes_each_change_once_and_ends_when_superseded(tmp_path, monkeypatch):
    """follow() answers at once, then only when what the run folder shows changes (here an event, the log), at
    most once a FOLLOW_GAP_S, with a "no change" every FOLLOW_BEAT_S so gradio can end the stream of a page
    gone; a newer follow() of the same page session (another run shown) ends the older one."""
    import asyncio

    import gradio as gr

    from lora_app.ui import train_step
    from lora_app.ui.context import Context

    monkeypatch.setattr(train_step, "FOLLOW_CHECK_S", 0.01)
    monkeypatch.setattr(train_step, "FOLLOW_GAP_S", 0.2)
    monkeypatch.setattr(train_step, "FOLLOW_BEAT_S", 0.6)
    skip = type(gr.skip())
    ctx = Context(tmp_path, None)
    for name in ("r1", "r2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"iters": 10}')
    runs.append_event(tmp_path / "r1", "train", step=1, loss=2.0)

    async def scenario() -> None:
        stream = train_step.follow(ctx, "r1", None, "page")
        first = await asyncio.wait_for(anext(stream), 1)
        assert points_in(first[2]) == [(1, 2.0, "train")] and first[6][:2] == ["r1", 1]
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.4)  # past the gap, before the beat
        assert not pending.done(), "an unchanged folder was answered"
        runs.append_event(tmp_path / "r1", "train", step=2, loss=1.5)
        second, at = await asyncio.wait_for(pending, 1), time.monotonic()
        assert points_in(second[2])[-1] == (2, 1.5, "train") and second[6][1] == 2
        (tmp_path / "r1" / "train.log").write_text("step 2 loss 1.5\n")  # at once: it waits for the gap
        assert (await asyncio.wait_for(anext(stream), 1))[4] == "step 2 loss 1.5"
        assert time.monotonic() - at >= 0.2
        beat = await asyncio.wait_for(anext(stream), 1)  # nothing changed for FOLLOW_BEAT_S
        assert all(isinstance(x, skip) for x in beat[:6]) and beat[6][4] == len("step 2 loss 1.5")

        other = train_step.follow(ctx, "r2", None, "page")  # the page shows another run
        assert (await asyncio.wait_for(anext(other), 1))[6][0] == "r2"
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 1)
        await other.aclose()
        assert "page" not in train_step.FOLLOWING

    asyncio.run(scenario())


def test_follow_goes_on_after_a_bad_read(tmp_path, monkeypatch):
    """A poll that fails shows a warning naming the run and the error, and the next change redraws everything:
    the page's one stream does not end on an error (before, the next 1 s poll simply tried again)."""
    import asyncio

    from lora_app.ui import timeline, train_step
    from lora_app.ui.context import Context

    monkeypatch.setattr(train_step, "FOLLOW_CHECK_S", 0.01)
    monkeypatch.setattr(train_step, "FOLLOW_GAP_S", 0.01)
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "config.json").write_text('{"iters": 10}')
    runs.append_event(tmp_path / "r1", "train", step=1, loss=2.0)
    real = timeline.loss_frame
    monkeypatch.setattr(timeline, "loss_frame", lambda events: 1 / 0)

    async def scenario() -> None:
        stream = train_step.follow(Context(tmp_path, None), "r1", None, "page")
        bad = await asyncio.wait_for(anext(stream), 1)
        assert "r1" in bad[5] and "division by zero" in bad[5] and bad[6] is None
        monkeypatch.setattr(timeline, "loss_frame", real)
        runs.append_event(tmp_path / "r1", "train", step=2, loss=1.5)
        good = await asyncio.wait_for(anext(stream), 1)
        assert len(points_in(good[2])) == 2 and good[5] == "Showing **r1** · new"
        await stream.aclose()

    asyncio.run(scenario())
