"""Issue 21's loose ends: every place two stores pair compares row digests; a dry run validates
the checkpoint it calls resumable; a stage's start stitch is checked against its stage record;
stale temp files of a run dir's own files are removed when a fit starts or resumes.

Stores of different pixels under the same names are the demo dataset drawn with two seeds:
the same file names, labels and splits (so the same manifest hash), other pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import extract_demo_stores
from typer.testing import CliRunner

from cli.stitchtrain_app import app
from featcache.store import FeatureStore

runner = CliRunner()
MODELS = ["dinov2-tiny"]


def _stores(root: Path, seed: int) -> dict[tuple[str, str], str]:
    return extract_demo_stores(
        root / f"data{seed}", root / f"stores{seed}", models=MODELS, layers=[2], shard_size=8,
        seed=seed, num_classes=2, per_class=6,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    """{"old": stores, "new": stores of other pixels under the same names, "run": a finished
    FFM run dir (dinov2-tiny -> a copy of its own stores: two stores of the same pixels)}."""
    root = tmp_path_factory.mktemp("pairs")
    old, new = _stores(root, 0), _stores(root, 1)
    for split in ("train", "test"):
        attrs = [FeatureStore.open(s[MODELS[0], split]).attrs for s in (old, new)]
        assert attrs[0]["dataset"]["manifest_hash"] == attrs[1]["dataset"]["manifest_hash"]
    copy = {
        s: shutil.copytree(old[MODELS[0], s], root / f"copy-{s}.zarr") for s in ("train", "test")
    }
    run = root / "run"
    result = runner.invoke(app, [
        "fit", "--source", old[MODELS[0], "train"], "--target", str(copy["train"]),
        "--source-test", old[MODELS[0], "test"], "--target-test", str(copy["test"]),
        "--position", "2", "--objective", "ffm", "--lrs", "1e-3", "--epochs", "1",
        "--out", str(run), "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"old": old, "new": new, "copy": copy, "run": run, "root": root}


def _refused(result, *names: str) -> None:
    """One ``error:`` line naming ``names``, exit status 2, no traceback."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error:") and "Traceback" not in text, text
    flat = "".join(text.split())
    assert "same images" in " ".join(text.split()), text
    for name in names:
        assert "".join(name.split()) in flat, (name, text)


def _store(pixels, which: str, split: str) -> str:
    return pixels[which][MODELS[0], split]


# -- 1. every pairing compares row digests ------------------------------------------------------
def test_cka_refuses_stores_of_different_pixels(pixels, tmp_path):
    old, new = _store(pixels, "old", "train"), _store(pixels, "new", "train")
    result = runner.invoke(app, ["cka", old, new, "--out", str(tmp_path / "cka")])
    _refused(result, old, new)
    same = runner.invoke(app, ["cka", old, str(pixels["copy"]["train"]), "--out", str(tmp_path)])
    assert same.exit_code == 0, same.output


def test_fit_and_transfer_refuse_test_stores_of_different_pixels(pixels, tmp_path):
    old_test, new_test = _store(pixels, "old", "test"), _store(pixels, "new", "test")
    train = _store(pixels, "old", "train")
    fitted = runner.invoke(app, [
        "fit", "--source", train, "--target", train, "--source-test", old_test,
        "--target-test", new_test, "--position", "2", "--objective", "ffm", "--lrs", "1e-3",
        "--epochs", "1", "--out", str(tmp_path / "run"), "--device", "cpu",
    ])  # fmt: skip
    _refused(fitted, old_test, new_test)
    assert not (tmp_path / "run" / "metrics.json").exists()
    transferred = runner.invoke(app, [
        "transfer", str(pixels["run"]), "--source", train, "--target", train,
        "--source-test", old_test, "--target-test", new_test, "--out", str(tmp_path / "t"),
        "--epochs", "1", "--device", "cpu",
    ])  # fmt: skip
    _refused(transferred, old_test, new_test)
    assert not (tmp_path / "t" / "metrics.json").exists()


def test_predictions_refuse_runs_tested_on_different_pixels(pixels, tmp_path):
    probes = {}
    for which in ("old", "new"):
        probes[which] = tmp_path / f"probe-{which}"
        result = runner.invoke(app, [
            "probe", "--store", _store(pixels, which, "train"), "--test-store",
            _store(pixels, which, "test"), "--out", str(probes[which]), "--lr", "1e-3",
            "--epochs", "1",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
    args = ["predictions", str(pixels["run"]), str(probes["old"]), str(probes["new"])]
    _refused(runner.invoke(app, args), _store(pixels, "new", "test"))
    same = ["predictions", str(pixels["run"]), str(probes["old"]), str(probes["old"])]
    assert runner.invoke(app, same).exit_code == 0


def test_tree_build_and_eval_refuse_a_run_whose_store_now_holds_other_pixels(pixels, tmp_path):
    """The run's target store re-extracted from other pixels under the same path and id."""
    run = shutil.copytree(pixels["run"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    for role, split in (("target", "train"), ("target_test", "test")):
        moved = tmp_path / f"{split}.zarr"
        shutil.copytree(_store(pixels, "new", split), moved)
        assert (
            FeatureStore.open(str(moved)).attrs["store_id"]
            == (FeatureStore.open(config[role]).attrs["store_id"])
        )
        config[role] = str(moved)
    (run / "config.json").write_text(json.dumps(config))
    built = runner.invoke(app, [
        "tree", "build", "--trunk", MODELS[0], "--position", "2", "--branch", f"b={run}",
        "--out", str(tmp_path / "tree"),
    ])  # fmt: skip
    _refused(built, config["source"], config["target"])
    _refused(runner.invoke(app, ["eval", str(run)]), config["source"], config["target"])
