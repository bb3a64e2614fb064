"""Issue 21's loose ends: every place two stores pair compares row digests; a dry run validates
the checkpoint it calls resumable; a stage's start stitch is checked against its stage record;
stale temp files of a run dir's own files are removed when a fit starts or resumes.

Stores of different pixels under the same names are the demo dataset drawn with two seeds:
the same file names, labels and splits (so the same manifest hash), other pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import extract_demo_stores
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.stitchtrain_app import app
from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.data.pairing import PairingError
from stitchtrain.pipeline.fit import StitchRecipe, fit
from stitchtrain.pipeline.plan import plan_fit
from stitchtrain.studies.sweep.grid import plan_sweep
from stitchtrain.train.config import FitConfig

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


def test_sweep_refuses_stores_of_different_pixels_before_any_point_runs(pixels):
    stores = {
        "a": {"train": _store(pixels, "old", "train"), "test": _store(pixels, "old", "test")},
        "b": {"train": _store(pixels, "new", "train"), "test": _store(pixels, "new", "test")},
    }
    with pytest.raises(PairingError, match="same images"):
        plan_sweep({"stores": stores, "grid": {"positions": [2]}})
    stores["b"]["train"] = str(pixels["copy"]["train"])  # train paired, test stores not
    with pytest.raises(PairingError, match="same images") as refused:
        plan_sweep({"stores": stores, "grid": {"positions": [2]}})
    assert _store(pixels, "new", "test") in str(refused.value)
    stores["b"]["test"] = str(pixels["copy"]["test"])
    assert plan_sweep({"stores": stores, "grid": {"positions": [2]}}).points


# -- run dirs: a checkpoint, a stage's start stitch and temp files ------------------------------
class _Interrupted(Exception):
    """Raised right after a checkpoint is written: the run dir as a kill leaves it."""


def _run_config(pixels, out: Path, **overrides) -> FitConfig:
    train = (_store(pixels, "old", "train"), str(pixels["copy"]["train"]))
    test = (_store(pixels, "old", "test"), str(pixels["copy"]["test"]))
    options = dict(position=2, objective="ffm+tlt", lrs=(1e-3,), epochs=2, patience=2)
    options.update(batch_size=8, device="cpu", **overrides)
    return FitConfig(
        source=train[0], target=train[1], source_test=test[0], target_test=test[1],
        out=str(out), **options,
    )  # fmt: skip


def _interrupt(config: FitConfig, stage_index: int) -> Path:
    """Fit ``config`` until its first checkpoint inside stage ``stage_index``."""

    class Stops(StitchRecipe):
        def _save_checkpoint(self, index, *args):
            super()._save_checkpoint(index, *args)
            if index == stage_index:
                raise _Interrupted

    with pytest.raises(_Interrupted):
        Stops(config, checkpoint_every=0).run()
    return Path(config.out)


def _tensors_file(out: Path) -> Path:
    return out / json.loads((out / "checkpoint.json").read_text())["tensors"]["file"]


def _edit_state(out: Path) -> None:
    record = json.loads((out / "checkpoint.json").read_text())
    record["state"]["epoch"] += 1
    (out / "checkpoint.json").write_text(json.dumps(record))


def _edit_tensors(out: Path) -> None:
    path = _tensors_file(out)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _link_tensors(out: Path) -> None:
    path = _tensors_file(out)
    moved = path.parent.parent / f"outside-{path.name}"
    path.rename(moved)
    path.symlink_to(moved)


def test_dry_run_validates_the_checkpoint_it_calls_resumable(pixels, tmp_path):
    out = _interrupt(_run_config(pixels, tmp_path / "run"), 0)
    snapshot = shutil.copytree(out, tmp_path / "snapshot")
    assert plan_fit(_run_config(pixels, out)).run_dir == "resumable"
    for edit, why in (
        (_edit_state, "does not match the digest"),
        (_edit_tensors, "SHA-256"),
        (_link_tensors, "link"),
    ):
        shutil.rmtree(out)
        shutil.copytree(snapshot, out, symlinks=True)
        edit(out)
        with pytest.raises(FeatcacheError) as refused:
            plan_fit(_run_config(pixels, out))
        message = " ".join(str(refused.value).split())
        assert "Cannot resume from" in message and why in message, message
        assert "\n" not in str(refused.value)
    # a config.json edited after the kill, and a command matching the edit
    shutil.rmtree(out)
    shutil.copytree(snapshot, out)
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "patience": 3}))
    with pytest.raises(FeatcacheError, match="another config"):
        plan_fit(_run_config(pixels, out, patience=3))


@pytest.mark.parametrize("damage", ["other tensors", "symlink"])
def test_a_stages_start_stitch_is_checked_against_its_stage_record(pixels, tmp_path, damage):
    out = _interrupt(_run_config(pixels, tmp_path / "run"), 1)  # inside TLT, after FFM
    stitch = out / "stitch-ffm.safetensors"
    state = load_file(str(stitch))
    if damage == "other tensors":  # the same shapes, other values
        save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(stitch))
    else:  # the same bytes, behind a link out of the run dir
        moved = shutil.copyfile(stitch, tmp_path / "elsewhere.safetensors")
        stitch.unlink()
        stitch.symlink_to(moved)
    with pytest.raises(FeatcacheError) as refused:
        fit(_run_config(pixels, out))
    message = " ".join(str(refused.value).split())
    assert "stitch-ffm.safetensors" in message and "\n" not in str(refused.value)
    assert ("SHA-256" if damage == "other tensors" else "link") in message, message
    assert not (out / "metrics.json").exists() and (out / "checkpoint.json").exists()


def _temp_name(target: str, pid: int, sequence: int = 0) -> str:
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{target}.fc-{pid}-{host}-{sequence}.partial"


def test_a_fit_removes_stale_temp_files_of_its_own_files_only(pixels, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a writer that is provably gone: this host, no such process
    ours = ["stitch-ffm.safetensors", "stitch.safetensors", "head.safetensors",
            "stage-ffm.json", "metrics.json", "checkpoint.json"]  # fmt: skip
    stale = [_temp_name(name, gone.pid, i) for i, name in enumerate(ours)]
    kept = [
        _temp_name("stitch-ffm.safetensors", os.getppid()),  # a live writer's
        _temp_name("notes.txt", gone.pid),  # a user's file, not one fit writes
        _temp_name("stitch-ffm.safetensors.bak", gone.pid),
        "stitch-ffm.safetensors.partial",
    ]
    # resuming: the run dir of a fit stopped inside TLT, with the temp files of a killed one
    out = _interrupt(_run_config(pixels, tmp_path / "run"), 1)
    for name in stale + kept:
        (out / name).write_bytes(b"partial")
    fit(_run_config(pixels, out))
    assert (out / "metrics.json").is_file()
    left = sorted(p.name for p in out.iterdir() if "partial" in p.name)
    assert left == sorted(kept)
    # starting: a fresh run dir
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in stale + kept:
        (fresh / name).write_bytes(b"partial")
    fit(_run_config(pixels, fresh, objective="ffm", epochs=1))
    assert sorted(p.name for p in fresh.iterdir() if "partial" in p.name) == sorted(kept)
