"""Ctrl-C (issue 23.1) in a sweep point, and in fit's setup and test evaluation: real SIGINTs
to `stitchtrain` subprocesses (a file of its own so that the suite's workers run it beside the
other Ctrl-C tests)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import pair_fit_config
from test_newcomer_ctrlc import (
    _assert_same_outcome,
    _cli,
    _fit_args,
    _interrupt_after,
    _one_line,
    _outcome,
    _run,
    make_stores,
)

from stitchtrain.pipeline.fit import fit
from stitchtrain.train.config import FitConfig


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory)


# -- sweep -----------------------------------------------------------------------------------------
def _sweep_config(stores, path: Path) -> Path:
    """dinov2-tiny <-> clip-tiny at position 2, FFM, lrs 1e-3 and 5e-3, 3 epochs: 2 probes
    and 2 stitch points."""
    path.write_text(
        f"""
dataset = "shapes"

[stores]
dinov2 = {{ train = "{stores["dinov2-tiny", "train"]}", test = "{stores["dinov2-tiny", "test"]}" }}
clip = {{ train = "{stores["clip-tiny", "train"]}", test = "{stores["clip-tiny", "test"]}" }}

[grid]
pairs = [["dinov2", "clip"]]
positions = [2]
objectives = ["ffm"]

[baselines]
self_stitch = false

[fit]
lrs = [1e-3, 5e-3]
epochs = 3
patience = 3
batch_size = 8
"""
    )
    return path


def test_ctrl_c_during_a_sweep_point_and_the_same_command_completes_the_sweep(stores, tmp_path):
    """Ctrl-C in the first epoch of the first stitch point (the 2 probes are finished): the
    epoch finishes and is checkpointed, one line counts the finished points and says the same
    command resumes, exit 130; the re-run completes the sweep, each point's metrics those of
    an uninterrupted sweep."""
    from stitchtrain.studies.sweep.config import load_sweep_config
    from stitchtrain.studies.sweep.grid import plan_sweep
    from stitchtrain.studies.sweep.results import read_results
    from stitchtrain.studies.sweep.run import run_sweep

    config = _sweep_config(stores, tmp_path / "sweep.toml")
    out = tmp_path / "sweep"
    command = _cli("stitchtrain", ["sweep", str(config), "--out", str(out)])
    status, output = _interrupt_after(command, "ffm lr 0.001 epoch 1/3")
    assert status == 130, output
    stopped = _one_line(output, "Stopped by SIGINT")
    point = "dinov2--clip--ffm--mlp--n2--s0"
    stopped_at = re.fullmatch(
        r"Stopped by SIGINT after epoch (\d) of stage ffm, lr 0.001: the checkpoint in "
        rf"\S+/runs/{point} holds the run so far; the same command resumes it\. Sweep point "
        rf"{point}: 2 of 4 points of the sweep in {out} are finished and kept; the same command "
        r"resumes the sweep\.",
        stopped,
    )
    assert stopped_at, stopped
    assert (out / "runs" / point / "checkpoint.json").is_file()
    epoch = int(stopped_at.group(1))

    again = _run(command)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(": done before") == 2
    resumed = _one_line(again.stdout, "resuming ")
    if epoch < 3:  # else: "after the last epoch of ..."
        assert resumed.startswith(f"resuming from epoch {epoch + 1} of stage ffm (lr 0.001, 1/2)")

    plan = plan_sweep(load_sweep_config(config), base=config.parent)
    reference = run_sweep(plan, tmp_path / "reference")
    timing = ["seconds", "skipped"]
    got = read_results(out).drop(columns=timing).reset_index(drop=True)
    want = reference.drop(columns=timing).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


# -- fit's setup and evaluation --------------------------------------------------------------------
# The real CLI, with one Ctrl-C sent by the process to itself as fit's search for the test
# stores starts (setup: the stores are open, the encoder loaded) or as its test evaluation starts.
_CTRL_C_IN = """
import os, signal, sys
import stitchtrain.pipeline.fit as pipeline
name = {"setup": "evaluation_split", "evaluation": "evaluate_run"}[os.environ["CTRL_C_IN"]]
work = getattr(pipeline, name)
def ctrl_c(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return work(*args, **kwargs)
setattr(pipeline, name, ctrl_c)
from cli.stitchtrain_app import app
app()
"""


def test_ctrl_c_during_fit_setup_or_evaluation_says_what_is_kept(stores, tmp_path):
    """Ctrl-C in setup (nothing trained: it says so), in the test evaluation (training is
    complete and checkpointed: it says the same command re-runs only the evaluation), in setup
    again (it names the checkpoint): one line each, exit 130; the same command then evaluates
    without training an epoch and ends bitwise as an uninterrupted run."""
    config = pair_fit_config(stores, tmp_path / "run")
    ctrl_c = [sys.executable, "-c", _CTRL_C_IN, *_fit_args(config)]
    out = config.out

    done = _run(ctrl_c, CTRL_C_IN="setup")
    output = done.stdout + done.stderr
    assert done.returncode == 130, output
    assert _one_line(output, "Stopped") == (
        "Stopped by SIGINT while setting up the fit (stores, encoder): nothing was trained yet; "
        "the same command starts the run."
    )
    assert not (tmp_path / "run" / "checkpoint.json").exists()

    done = _run(ctrl_c, CTRL_C_IN="evaluation")
    output = done.stdout + done.stderr
    assert done.returncode == 130, output
    assert _one_line(output, "Stopped") == (
        f"Stopped by SIGINT during the test evaluation: training is complete and checkpointed in "
        f"{out}; the same command re-runs only the evaluation."
    )
    assert not (tmp_path / "run" / "metrics.json").exists()

    done = _run(ctrl_c, CTRL_C_IN="setup")
    output = done.stdout + done.stderr
    assert done.returncode == 130, output
    assert _one_line(output, "Stopped") == (
        "Stopped by SIGINT while setting up the fit (stores, encoder): "
        f"{out} keeps the checkpoint after the last lr of stage tlt; the same command resumes "
        "from there."
    )

    again = _run(_cli("stitchtrain", _fit_args(config)))
    assert again.returncode == 0, again.stdout + again.stderr
    assert " epoch " not in again.stdout, again.stdout
    assert _one_line(again.stdout, "resuming ").startswith("resuming at the end of stage tlt")
    reference = FitConfig(**json.loads((tmp_path / "run" / "config.json").read_text()))
    reference.out = str(tmp_path / "reference")
    fit(reference)
    _assert_same_outcome(_outcome(tmp_path / "run"), _outcome(tmp_path / "reference"))
