"""Shared stages: an LFM / FFM stage another run dir finished is taken from it, not trained,
when it is the same computation (``StitchRecipe.stage_key``), and the run ends exactly as one
that trained it: ffm <-> ffm+tlt both ways, a resume inside the next stage, a sweep. A stage of
another config, or whose stitch file changed, is trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import extract_demo_stores, history_without_timing, pair_fit_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.stitchtrain_app import app
from stitchtrain.pipeline.fit import StitchRecipe, fit
from stitchtrain.train.config import FitConfig


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    return extract_demo_stores(
        root / "data", root / "stores", models=["dinov2-tiny", "clip-tiny"], layers=[1, 2],
        shard_size=4,
    )  # fmt: skip


def _config(stores, out, **overrides) -> FitConfig:
    tests = dict(source_test=stores["dinov2-tiny", "test"], target_test=stores["clip-tiny", "test"])
    return pair_fit_config(stores, out, **{"epochs": 2, **tests, **overrides})


def _outcome(out: Path) -> dict:
    history = history_without_timing(out)
    metrics = json.loads((out / "metrics.json").read_text())
    reused = {
        stage: result.pop("reused_from")
        for stage, result in metrics["stages"].items()
        if "reused_from" in result
    }
    files = {p.name: load_file(str(p)) for p in sorted(out.glob("*.safetensors"))}
    return {"history": history, "metrics": metrics, "files": files, "reused": reused}


def _assert_same(got: dict, want: dict) -> None:
    assert got["files"].keys() == want["files"].keys()
    for name, tensors in want["files"].items():
        assert tensors.keys() == got["files"][name].keys(), name
        for key, value in tensors.items():
            assert got["files"][name][key].equal(value), (name, key)
    assert got["history"] == want["history"]
    assert got["metrics"] == want["metrics"]


def _events(config: FitConfig, reuse) -> list[dict]:
    events: list[dict] = []
    fit(config, events.append, reuse=reuse)
    return events


def _trained(events: list[dict]) -> list[str]:
    return sorted({e["stage"] for e in events if e["event"] == "lr_start"})


@pytest.fixture(scope="module")
def runs(stores, tmp_path_factory):
    """ffm and ffm+tlt, each trained on its own (no reuse)."""
    root = tmp_path_factory.mktemp("runs")
    for objective in ("ffm", "ffm+tlt"):
        fit(_config(stores, root / objective, objective=objective))
    return root


def test_ffm_tlt_takes_the_ffm_stage_of_an_ffm_run_and_ends_as_if_it_trained_it(
    stores, runs, tmp_path
):
    config = _config(stores, tmp_path / "run")
    events = _events(config, [runs / "ffm"])
    assert _trained(events) == ["tlt"]
    assert [e["from"] for e in events if e["event"] == "stage_reused"] == [str(runs / "ffm")]
    got = _outcome(tmp_path / "run")
    assert got["reused"] == {"ffm": str(runs / "ffm")}
    _assert_same(got, _outcome(runs / "ffm+tlt"))
    # the reusing run records the stage too, so it can be taken from there in turn
    assert (tmp_path / "run" / "stage-ffm.json").read_text() == (
        runs / "ffm" / "stage-ffm.json"
    ).read_text()


def test_ffm_takes_the_ffm_stage_of_an_ffm_tlt_run(stores, runs, tmp_path):
    config = _config(stores, tmp_path / "run", objective="ffm")
    assert _trained(_events(config, [tmp_path / "absent", runs / "ffm+tlt"])) == []
    _assert_same(_outcome(tmp_path / "run"), _outcome(runs / "ffm"))


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"epochs": 3},
        {"lrs": (1e-3,)},
        {"position": 1},
        {"batch_size": 4},
        {"val_fraction": 0.2},
    ],
)
def test_a_stage_of_another_config_is_trained(stores, runs, tmp_path, change):
    config = _config(stores, tmp_path / "run", objective="ffm", **change)
    assert _trained(_events(config, [runs / "ffm", runs / "ffm+tlt"])) == ["ffm"]
    assert _outcome(tmp_path / "run")["reused"] == {}


def test_options_only_later_stages_or_scoring_read_do_not_split_the_stage(stores, runs, tmp_path):
    config = _config(
        stores, tmp_path / "run", head="probe", miou="mmseg", source_test=None, target_test=None
    )
    assert "ffm" not in _trained(_events(config, [runs / "ffm"]))


def test_a_changed_stitch_file_is_not_taken(stores, runs, tmp_path):
    source = tmp_path / "ffm"
    shutil.copytree(runs / "ffm", source)
    path = source / "stitch-ffm.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    config = _config(stores, tmp_path / "run", objective="ffm")
    assert _trained(_events(config, [source])) == ["ffm"]


def test_a_stitch_file_of_other_shapes_is_not_taken_even_with_its_hash_recorded(
    stores, runs, tmp_path
):
    import hashlib

    import torch
    from safetensors.torch import save

    source = tmp_path / "ffm"
    shutil.copytree(runs / "ffm", source)
    payload = save({"weight": torch.zeros(2, 2)})
    (source / "stitch-ffm.safetensors").write_bytes(payload)
    record = json.loads((source / "stage-ffm.json").read_text())
    record["stitch_sha256"] = hashlib.sha256(payload).hexdigest()
    (source / "stage-ffm.json").write_text(json.dumps(record))
    config = _config(stores, tmp_path / "run", objective="ffm")
    assert _trained(_events(config, [source])) == ["ffm"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.update(history="rows"),
        lambda r: r.update(history=[]),
        lambda r: r["result"].pop("val_loss"),
        lambda r: r["history"][0].update(stage="tlt"),
        lambda r: r.update(result=None),
    ],
)
def test_a_damaged_stage_record_is_not_taken(stores, runs, tmp_path, damage):
    source = tmp_path / "ffm"
    shutil.copytree(runs / "ffm", source)
    record = json.loads((source / "stage-ffm.json").read_text())
    damage(record)
    (source / "stage-ffm.json").write_text(json.dumps(record))
    config = _config(stores, tmp_path / "run", objective="ffm")
    assert _trained(_events(config, [source])) == ["ffm"]


class _StopsInTlt(StitchRecipe):
    def _train_epoch(self, stage, *args, **kwargs):
        row = super()._train_epoch(stage, *args, **kwargs)
        if stage == "tlt" and row["epoch"] == 2:  # the second epoch (counted from 1)
            raise KeyboardInterrupt("stopped")
        return row


def test_resume_inside_the_next_stage_after_a_taken_stage_is_exact(stores, runs, tmp_path):
    config = _config(stores, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        _StopsInTlt(config, checkpoint_every=0, reuse=[runs / "ffm"]).run()
    assert (tmp_path / "run" / "checkpoint.json").is_file()
    fit(config, reuse=[runs / "ffm"])
    got = _outcome(tmp_path / "run")
    assert got["reused"] == {"ffm": str(runs / "ffm")}
    _assert_same(got, _outcome(runs / "ffm+tlt"))


def test_fit_cli_reuse(stores, runs, tmp_path):
    config = _config(stores, tmp_path / "run")
    args = ["fit", "--source", config.source, "--target", config.target, "--position", "2"]
    args += ["--source-test", config.source_test, "--target-test", config.target_test]
    args += ["--lr", "1e-3,5e-3", "--epochs", "2", "--patience", "2", "--batch-size", "8"]
    reuse = ["--out", config.out, "--reuse", str(runs / "ffm")]
    result = CliRunner().invoke(app, [*args, *reuse, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["reused"] == {"ffm": str(runs / "ffm")}
    assert plan["max_steps"] == 2 * plan["steps_per_epoch"]["tlt"] * 2  # the TLT stage only
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, [*args, *reuse])
    assert result.exit_code == 0, result.output
    assert f"taken from {runs / 'ffm'}" in result.output
    _assert_same(_outcome(tmp_path / "run"), _outcome(runs / "ffm+tlt"))
    other = ["--out", str(tmp_path / "seed1"), "--seed", "1", "--reuse", str(runs / "ffm")]
    result = CliRunner().invoke(app, [*args, *other])
    assert result.exit_code == 0, result.output
    assert "no finished LFM / FFM stage in the --reuse run dirs is this run's" in result.output
    missing = tmp_path / "missing"
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--reuse", str(missing)])
    assert result.exit_code == 2
    assert str(missing) in result.output and "--reuse" in result.output


def test_a_sweep_shares_the_ffm_stage_between_its_ffm_and_ffm_tlt_points(stores, tmp_path):
    from stitchtrain.studies.sweep.config import load_sweep_config
    from stitchtrain.studies.sweep.grid import plan_sweep
    from stitchtrain.studies.sweep.run import run_sweep

    (tmp_path / "sweep.toml").write_text(
        f"""
dataset = "shapes"
[stores]
dinov2 = "{stores["dinov2-tiny", "train"]}"
clip = "{stores["clip-tiny", "train"]}"
[grid]
pairs = [["dinov2", "clip"]]
positions = [2]
objectives = ["ffm", "ffm+tlt"]
[baselines]
probe = false
self_stitch = false
[fit]
lrs = [5e-3]
epochs = 1
patience = 1
batch_size = 8
"""
    )
    plan = plan_sweep(load_sweep_config(tmp_path / "sweep.toml"), base=tmp_path)
    table = run_sweep(plan, tmp_path / "out")
    assert list(table.status) == ["ok"] * 4, table.error.tolist()  # both directions
    source = stores["dinov2-tiny", "train"]
    runs = {
        p.config["objective"]: p.run_dir(tmp_path / "out")
        for p in plan.points
        if p.config["source"] == source
    }
    metrics = json.loads((runs["ffm+tlt"] / "metrics.json").read_text())
    assert metrics["stages"]["ffm"]["reused_from"] == str(runs["ffm"])
    # the point's dry-run plan (sweep --dry-run) names the stage it takes
    point = next(p for p in plan.points if p.run_dir(tmp_path / "out") == runs["ffm+tlt"])
    assert point.fit_plan(tmp_path / "out").reused == {"ffm": str(runs["ffm"])}
    config = _config(
        stores, tmp_path / "alone", lrs=(5e-3,), epochs=1, patience=1, source_test=None,
        target_test=None,
    )  # fmt: skip
    fit(config)
    _assert_same(_outcome(runs["ffm+tlt"]), _outcome(tmp_path / "alone"))
