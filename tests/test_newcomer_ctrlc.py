"""Ctrl-C (issue 23.1): a real SIGINT to `stitchtrain fit` and `featcache extract` subprocesses.

The first Ctrl-C lets the epoch in progress finish (fit) or the shards being written be marked
(extract), keeps that, says in one line that the same command resumes, and exits 130; the
re-run resumes (fit says from where) and ends as an uninterrupted run, bitwise. A second
Ctrl-C stops at once, saying what was kept. Like the SIGTERM test of test_redteam_fit.py, the
subprocesses use this process's torch thread count, so their float reductions are the same.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import extract_demo_stores, history_without_timing, pair_fit_config
from safetensors.torch import load_file

from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore
from stitchtrain.pipeline.fit import fit
from stitchtrain.train.config import FitConfig

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}

# The real CLI, with one Ctrl-C, then another, sent by the process to itself at the start of
# the N-th training epoch (fit) or shard computation (extract): os.kill runs the handler
# before it returns, so the first is handled before the second is sent.
_CTRL_C_TWICE = """
import os, signal, sys
import featcache.extract.run as extract_run
from stitchtrain.train.trainer import StitchTrainer
calls = 0
def ctrl_c_twice(work):
    def wrapped(*args, **kwargs):
        global calls
        calls += 1
        if calls == int(os.environ["CTRL_C_AT"]):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return work(*args, **kwargs)
    return wrapped
StitchTrainer._train_epoch = ctrl_c_twice(StitchTrainer._train_epoch)
extract_run._encode_shard = ctrl_c_twice(extract_run._encode_shard)
from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
app = {"featcache": featcache_app, "stitchtrain": stitchtrain_app}[sys.argv[1]]
sys.argv = sys.argv[1:]
app()
"""


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory)


def make_stores(tmp_path_factory):
    """{(model, split): url}: dinov2-tiny and clip-tiny, layer 2, 3 classes x 8 images."""
    root = tmp_path_factory.mktemp("ctrlc")
    return extract_demo_stores(
        root / "data", root / "stores", models=["dinov2-tiny", "clip-tiny"], layers=[2],
        shard_size=4,
    )  # fmt: skip


def _cli(tool: str, args: list[str]) -> list[str]:
    module = {"featcache": "cli.featcache_app", "stitchtrain": "cli.stitchtrain_app"}[tool]
    return [sys.executable, "-m", module, *args]


def _interrupt_after(command: list[str], line: str) -> tuple[int, str]:
    """Run ``command``; send it one SIGINT (a Ctrl-C) once a line containing ``line`` is
    printed. (exit status, everything it printed)."""
    process = subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    printed = []
    for got in process.stdout:
        printed.append(got)
        if line in got:
            process.send_signal(signal.SIGINT)
            break
    printed.append(process.stdout.read())
    return process.wait(timeout=300), "".join(printed)


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True, timeout=300
    )


def _one_line(output: str, start: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(start)]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


# -- fit -------------------------------------------------------------------------------------------
def _fit_args(config: FitConfig) -> list[str]:
    return [
        "fit", "--source", config.source, "--target", config.target,
        "--position", str(config.position), "--out", config.out,
        "--objective", config.objective, "--lr", ",".join(f"{lr:g}" for lr in config.lrs),
        "--epochs", str(config.epochs), "--patience", str(config.patience),
        "--batch-size", str(config.batch_size),
    ]  # fmt: skip


def _outcome(out: Path) -> dict:
    return {
        "stitch": load_file(str(out / "stitch.safetensors")),
        "head": load_file(str(out / "head.safetensors")),
        "history": history_without_timing(out),
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def _assert_same_outcome(got: dict, want: dict) -> None:
    for name in ("stitch", "head"):
        assert got[name].keys() == want[name].keys()
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (name, key)
    assert got["history"] == want["history"]
    assert got["metrics"] == want["metrics"]


def test_ctrl_c_checkpoints_the_epoch_and_the_same_command_resumes_exactly(stores, tmp_path):
    """`fit --epochs 3` over 2 stages x 2 lrs, Ctrl-C after the first epoch line: the epoch in
    progress finishes and is checkpointed, one line says the same command resumes, exit 130;
    the re-run says from where it resumes and ends bitwise as an uninterrupted run."""
    config = pair_fit_config(stores, tmp_path / "run")
    command = _cli("stitchtrain", _fit_args(config))
    status, output = _interrupt_after(command, "ffm lr 0.001 epoch 1/3")
    assert status == 130, output
    assert "SIGINT: stopping after the epoch in progress" in output
    stopped = _one_line(output, "Stopped by SIGINT after epoch ")
    assert stopped.endswith(f"the checkpoint in {config.out} holds the run so far; the same "
                            "command resumes it.")  # fmt: skip
    epoch, stage, lr = re.match(r"Stopped by SIGINT after epoch (\d+) of stage (\w+), lr ([\d.]+)",
                                stopped).groups()  # fmt: skip
    assert (tmp_path / "run" / "checkpoint.json").is_file()
    assert not (tmp_path / "run" / "metrics.json").exists()

    again = _run(command)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = _one_line(again.stdout, "resuming ")
    if int(epoch) < config.epochs:  # else: "after the last epoch of stage ..."
        assert resumed.startswith(f"resuming from epoch {int(epoch) + 1} of stage {stage} (lr {lr}")
    assert resumed.endswith(f"the checkpoint in {config.out}")

    reference = FitConfig(**json.loads((tmp_path / "run" / "config.json").read_text()))
    reference.out = str(tmp_path / "reference")
    fit(reference)
    _assert_same_outcome(_outcome(tmp_path / "run"), _outcome(tmp_path / "reference"))


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(stores, tmp_path):
    """Ctrl-C twice in the second epoch of the second learning rate (no epoch checkpoint is
    due at the default interval): the epoch is cut, and the line says which checkpoint is
    kept (the first lr's end), which the same command resumes from."""
    config = pair_fit_config(stores, tmp_path / "run")
    done = _run(
        [sys.executable, "-c", _CTRL_C_TWICE, "stitchtrain", *_fit_args(config)], CTRL_C_AT="5"
    )
    output = done.stdout + done.stderr
    assert done.returncode == 130, output
    assert _one_line(output, "Stopped at once") == (
        f"Stopped at once by a second SIGINT: {config.out} keeps the checkpoint at the start of "
        "lr 0.005 (2/2) of stage ffm; the same command resumes from there."
    )
    assert "ffm lr 0.005 epoch 1/3" in output and "ffm lr 0.005 epoch 2/3" not in output
    state = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert (state["stage_index"], state["state"]["lr_index"], state["state"]["epoch"]) == (0, 1, 0)


# -- extract ---------------------------------------------------------------------------------------
def _extract_args(stores, out: Path) -> list[str]:
    data = FeatureStore.open(stores["dinov2-tiny", "train"]).attrs["dataset"]["source"]
    return [
        "extract", "--model", "dinov2-tiny", "--data", data, "--out", str(out), "--layers", "2",
        "--split", "train", "--shard-size", "1", "--batch-size", "1",
    ]  # fmt: skip


def _chunks(url: str) -> dict[str, bytes]:
    """Every chunk object of a store (``<array>/c/...``): its bytes by key."""
    root = Path(url)
    files = (p for p in root.glob("*/**/c/**/*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_ctrl_c_during_extract_keeps_the_marked_shards_and_the_same_command_completes(
    stores, tmp_path
):
    """18 shards of one image; Ctrl-C once the first is written: the shards being written are
    marked and valid (verify faults only the unmarked ones), the line counts them, exit 130;
    the same command completes the store, equal to an uninterrupted extraction."""
    command = _cli("featcache", _extract_args(stores, tmp_path / "out"))
    status, output = _interrupt_after(command, "extract train 1/18")
    assert status == 130, output
    url = str(next((tmp_path / "out" / "train").glob("*.zarr")))
    marked = FeatureStore.open(url).marked_shards()
    assert 1 <= len(marked) < 18
    assert _one_line(output, "Stopped by SIGINT") == (
        f"Stopped by SIGINT: {len(marked)} of 18 shards of {url} are complete (marked and "
        "kept); the same command resumes the rest."
    )
    verify = _run(_cli("featcache", ["verify", url, "--json"]))
    faults = json.loads(verify.stdout)["faults"]
    assert faults == [
        f"shard {i}: no completion marker (incomplete)" for i in range(18) if i not in marked
    ]

    again = _run(command)
    assert again.returncode == 0, again.stdout + again.stderr
    assert FeatureStore.open(url).verify() == []
    config = ExtractConfig(
        models=["dinov2-tiny"], data=FeatureStore.open(url).attrs["dataset"]["source"],
        out=str(tmp_path / "reference"), layers=[2], split="train", shard_size=1, batch_size=1,
    )  # fmt: skip
    plan = plan_extraction(config)
    run_extraction(plan)
    chunks = _chunks(url)
    assert len(chunks) >= 18 * 4 and chunks == _chunks(plan.urls[0])  # layer 2, ids, labels, ...


def test_a_second_ctrl_c_stops_extract_at_once(stores, tmp_path):
    """Ctrl-C twice as the 4th shard starts computing: it is dropped, the write of the 3rd
    (already started) finishes with its marker, and the line counts those 3."""
    args = _extract_args(stores, tmp_path / "out")
    done = _run([sys.executable, "-c", _CTRL_C_TWICE, "featcache", *args], CTRL_C_AT="4")
    output = done.stdout + done.stderr
    assert done.returncode == 130, output
    url = str(next((tmp_path / "out" / "train").glob("*.zarr")))
    store = FeatureStore.open(url)
    assert store.marked_shards() == {0, 1, 2}
    assert _one_line(output, "Stopped at once") == (
        f"Stopped at once by a second SIGINT: 3 of 18 shards of {url} are complete (marked and "
        "kept); the same command resumes the rest."
    )
    assert not [f for f in store.verify() if "no completion marker" not in f]
