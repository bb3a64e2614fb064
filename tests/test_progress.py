"""Progress of long commands (cli/_progress.py): plain lines off a terminal, live bars on one.

CliRunner's output is no terminal, so every command here runs in plain mode: one line per
finished step, k of N (epochs 1-based), elapsed and ETA, never a carriage return.
"""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import extract_demo_stores
from rich.console import Console
from typer.testing import CliRunner

from cli._progress import FitProgress, progress_display
from cli.experiments_app import experiments_app
from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app

runner = CliRunner()
MODELS = ["dinov2-tiny", "siglip2-tiny"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split): url}, layers 1 and 2, 3 classes x 8 images; "root": the dir."""
    root = tmp_path_factory.mktemp("progress")
    urls = extract_demo_stores(
        root / "data", root / "stores", models=MODELS, layers=[1, 2], shard_size=16
    )
    return {**urls, "root": root}


def _fit_args(stores, out, *extra: str) -> list[str]:
    return [
        "fit",
        "--source",
        stores["dinov2-tiny", "train"],
        "--target",
        stores["siglip2-tiny", "train"],
        "--position",
        "2",
        "--out",
        str(out),
        "--random-init",
        *extra,
    ]


# -- the facility ---------------------------------------------------------------------------------
def _plain() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def test_plain_mode_prints_one_line_per_step_with_eta():
    console, buffer = _plain()
    with progress_display(console) as display:
        assert display.plain  # a StringIO console is no terminal
        with display.spinner("loading dinov2-tiny"):
            pass
        task = display.task("epoch", 3)
        for index in range(3):
            task.advance(note=f"[val] {index}")  # brackets are text, never rich markup
        task.finish()
        fine = display.task("read", 100, plain_every=3600)
        for _ in range(100):
            fine.advance()
        quiet = display.task("minor", None, quiet=True)
        quiet.finish()
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "loading dinov2-tiny ..."
    assert lines[1].startswith("loading dinov2-tiny: done in ")
    assert re.fullmatch(r"epoch 1/3 \[val\] 0 \| elapsed \d+\.\d s, ETA \d+\.\d s", lines[2])
    assert lines[4].startswith("epoch 3/3 [val] 2 | elapsed") and "ETA" not in lines[4]
    # plain_every: the first step and the last only; the quiet task prints nothing
    assert [line.split(" |")[0] for line in lines[5:]] == ["read 1/100", "read 100/100"]
    assert "\r" not in buffer.getvalue()


def test_live_mode_echoes_coarse_steps_only_and_fit_events_nest():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200)
    with progress_display(console) as display:
        assert not display.plain
        steps = display.task("sweep point", 2, echo=True)
        fit = FitProgress(display, parent=steps)
        fit({"event": "lr_start", "stage": "ffm", "stage_index": 0, "stages": ["ffm"],
             "lr": 0.01, "lr_index": 0, "lrs": 1, "epoch": 0, "epochs": 30})  # fmt: skip
        fit({"event": "epoch", "train_loss": 1.0, "val_loss": 2.0, "val_metric": None,
             "seconds": 0.1, "data_wait_s": 0.0, "data_gb_per_s": 1.0})  # fmt: skip
        rows = [task.description for task in display.live.tasks]
        assert rows == ["sweep point", "  ffm stage 1/1: lr", "    ffm lr 0.01 epoch"]
        assert display.live.tasks[-1].completed == 1  # epoch 1 of 30 done
        fit({"event": "lr_done", "stage": "ffm", "lr": 0.01, "epochs": 30, "epochs_run": 6,
             "best_epoch": 1, "val_loss": 2.0, "stopped_early": True})  # fmt: skip
        fit.close()
        steps.advance(note="point one")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())
    assert "ffm stage 1/1: lr 1/1 (0.01) done, 6/30 epochs (early stop), best epoch 1" in text
    assert "sweep point 1/2 point one" in text
    assert "epoch 1/30 train" not in text  # fine steps stay in the bar


# -- the commands ---------------------------------------------------------------------------------
def test_fit_counts_epochs_from_one_and_names_the_chosen_lr_per_stage(stores, tmp_path):
    out = tmp_path / "run"
    args = _fit_args(stores, out, "--objective", "lfm+tlt", "--lr", "1e-3,5e-3")
    result = runner.invoke(stitchtrain_app, [*args, "--epochs", "2", "--patience", "2"])
    assert result.exit_code == 0, result.output
    output = result.output
    assert "\r" not in output
    for stage in ("lfm", "tlt"):
        for lr in ("0.001", "0.005"):
            first = f"{stage} lr {lr} epoch 1/2 "
            assert first in output and f"{stage} lr {lr} epoch 2/2 " in output
            assert "ETA" in next(line for line in output.splitlines() if first in line)
    assert "epoch 0" not in output
    assert "lfm stage 1/2: lr 2/2 (0.005) done, 2/2 epochs" in output
    assert "tlt stage 2/2: lr 1/2 (0.001) done" in output
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    table = " ".join(output.replace("│", " ").split())
    for stage in ("lfm", "tlt"):
        assert f"{stage} chosen lr {stages[stage]['lr']:g} of 0.001, 0.005" in table


def test_fit_json_keeps_progress_off_stdout(stores, tmp_path):
    args = _fit_args(stores, tmp_path / "run", "--objective", "lfm", "--lr", "5e-3")
    result = runner.invoke(stitchtrain_app, [*args, "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert "test_accuracy" in json.loads(result.stdout)
    assert "lfm lr 0.005 epoch 1/1 " in result.stderr


def test_extract_of_complete_stores_has_nothing_to_do(stores):
    manifest = stores["root"] / "data" / "manifest.csv"
    args = ["extract", "--data", str(manifest), "--out", str(stores["root"] / "stores")]
    args += ["--layers", "1,2", "--split", "train", "--shard-size", "16"]
    args += [item for model in MODELS for item in ("--model", model)]
    result = runner.invoke(featcache_app, args)
    assert result.exit_code == 0, result.output
    assert "loading dinov2-tiny, siglip2-tiny ..." in result.output  # not "0/24 -:--:--"
    assert "extract train: complete, nothing to do (2 stores)" in result.output
    assert "extract train 0/" not in result.output
    result = runner.invoke(featcache_app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert all(store["complete"] for store in json.loads(result.stdout)["stores"])
    assert "complete, nothing to do" in result.stderr


def test_sweep_and_report_show_k_of_n(stores, tmp_path):
    config = tmp_path / "sweep.toml"
    dinov2, siglip2 = (
        f'{{ train = "{stores[m, "train"]}", test = "{stores[m, "test"]}" }}' for m in MODELS
    )
    config.write_text(
        f"""
dataset = "shapes"

[stores]
dinov2 = {dinov2}
siglip2 = {siglip2}

[grid]
pairs = [["dinov2", "siglip2"]]
both_directions = false
positions = [2]
objectives = ["lfm"]

[baselines]
self_stitch = false

[fit]
lrs = [5e-3]
epochs = 1
random_init = true
"""
    )
    args = ["sweep", str(config), "--out", str(tmp_path / "sweep")]
    result = runner.invoke(experiments_app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    points = [i for i, line in enumerate(lines) if line.startswith("sweep point ")]
    assert [lines[i].split(" ")[2] for i in points] == ["1/3", "2/3", "3/3"]
    assert "probe--dinov2--s0: ok" in lines[points[0]]
    epoch = next(i for i, line in enumerate(lines) if "lfm lr 0.005 epoch 1/1 " in line)
    assert points[1] < epoch < points[2]  # the stitch point's fit, shown while it runs
    assert "ETA" in lines[points[1]] and "ETA" not in lines[points[2]]
    again = runner.invoke(experiments_app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count(": done before") == 3 and "epoch" not in again.output
    report = [str(tmp_path / "sweep"), "--out", str(tmp_path / "report"), "--no-cka"]
    result = runner.invoke(experiments_app, ["report", *report, "--no-predictions"])
    assert result.exit_code == 0, result.output
    steps = re.findall(r"^report step (\d+)/(\d+) (.*) done \|", result.output, re.M)
    assert [int(k) for k, _, _ in steps] == list(range(1, int(steps[0][1]) + 1))
    assert steps[0][2] == "figures shapes" and steps[-1][2] == "pages"


def test_cka_and_tree_bench_show_k_of_n(stores, tmp_path):
    a, b = stores["dinov2-tiny", "train"], stores["siglip2-tiny", "train"]
    result = runner.invoke(stitchtrain_app, ["cka", a, b, "--out", str(tmp_path / "cka")])
    assert result.exit_code == 0, result.output
    counts = re.findall(r"CKA 2x2 layers, \d+ images (\d+)/(\d+) \| elapsed", result.output)
    assert counts[0][0] == "0" and counts[-1][0] == counts[-1][1] != "0"  # dask tasks k of N
    args = ["tree", "bench", "--encoder", "dinov2-tiny", "--encoder", "siglip2-tiny"]
    args += ["--positions", "2", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1"]
    result = runner.invoke(stitchtrain_app, [*args, "--random-init", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "loading encoders, building the systems ..." in result.output
    assert re.search(r"tree bench 1/2 naive batch 1: [\d.]+ ms.*ETA", result.output)
    assert re.search(r"tree bench 2/2 VST-2 batch 1: [\d.]+ ms", result.output)


def test_stitchtrain_demo_reports_each_step_as_it_ends(tmp_path):
    """The README's demo at one epoch per stage: a line per finished step, the fits' epochs
    between them, the number of test images in the table's title; and the whole pipeline ran
    (the assertions of test_cli's demo test, so that one run of the demo serves both)."""
    result = runner.invoke(stitchtrain_app, ["demo", "--out", str(tmp_path), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    steps = [i for i, line in enumerate(lines) if line.startswith("demo step ")]
    assert [lines[i].split(" ")[2] for i in steps] == [f"{k}/20" for k in range(1, 21)]
    assert "loading dinov2-tiny, siglip2-tiny ..." in lines[: steps[0]]
    assert any("img/s" in line for line in lines[: steps[0]])
    epochs = [i for i, line in enumerate(lines) if " epoch 1/1 " in line]
    # 16 fits: 4 LFM, 4 FFM, 8 FFM+TLT stages of 1 epoch; the 4 cross-model FFM+TLT fits take
    # their FFM stage from the FFM fit of the same pair and position (fit's shared stages)
    taken = [line for line in lines if re.search(r"ffm stage 1/2: taken from .*-ffm-\d", line)]
    assert len(epochs) == 20 and len(taken) == 4
    assert steps[3] < epochs[0] < steps[4] and epochs[-1] < steps[-1]
    metrics = json.loads((tmp_path / "runs" / "probe-dinov2-tiny" / "metrics.json").read_text())
    title = next(i for i, line in enumerate(lines) if "Test accuracy on" in line)
    assert f"Test accuracy on {metrics['test_images']} test images" in lines[title]
    assert steps[-1] < title
    for row in ("D linear probe", "S -> D", "self-stitch D -> D", "FFM+TLT", "LFM"):
        assert row in result.output
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 18
