"""stitchtrain fit against broken inputs and interruptions (red-team report on fit).

Incomplete stores are refused unless ``allow_incomplete``; unreadable shards and non-finite
features or losses end in one-line FeatcacheErrors; resume is bitwise exact after every
checkpoint (a real SIGKILL included); a finished run dir returns its metrics without training;
checkpoints are safetensors + JSON, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import (
    extract_demo_stores,
    history_without_timing,
    pair_fit_config,
    reseal_marker,
)
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from cli.stitchtrain_app import app
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore, StoreError
from stitchtrain.pipeline.fit import StitchRecipe, fit
from stitchtrain.train.config import FitConfig

MODES = {"staged": None, "streamed": "1"}  # memory_budget: default (fits) or one byte


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split): url}: 3 classes x 8 images, shards of 4 (18 train rows in 5 shards,
    6 test rows in 2), dinov2-tiny and clip-tiny with layer 2; plus ("partial", split): a
    clip-tiny (train) / dinov2-tiny (test) extraction stopped halfway (``--shard 0/2``: shards
    0, 2, 4 of train and 0 of test marked)."""
    root = tmp_path_factory.mktemp("redteam")
    models = ["dinov2-tiny", "clip-tiny"]
    urls = extract_demo_stores(
        root / "data", root / "stores", models=models, layers=[2], shard_size=4
    )
    for split, model in (("train", "clip-tiny"), ("test", "dinov2-tiny")):
        config = ExtractConfig(
            models=[model],
            data=FeatureStore.open(urls[model, split]).attrs["dataset"]["source"],
            out=str(root / "partial"),
            layers=[2],
            split=split,
            shard_size=4,
            shard=(0, 2),
        )
        plan = plan_extraction(config)
        run_extraction(plan)
        urls["partial", split] = plan.urls[0]
    return urls


def _config(stores, out, **overrides) -> FitConfig:
    defaults = dict(objective="ffm", lrs=(5e-3,), epochs=2, patience=2)
    return pair_fit_config(stores, out, **{**defaults, **overrides})


def _copy(url: str, where: Path) -> str:
    shutil.copytree(url, where)
    return str(where)


def _unmarked_copy(url: str, where: Path, shards) -> str:
    """A copy of a complete store with the markers of ``shards`` deleted (data kept)."""
    copy = _copy(url, where)
    store = FeatureStore.open(copy)
    for shard in shards:
        os.remove(store._marker_path(shard))
    assert store.missing_shards() == sorted(shards)
    return copy


def _checkpoint_files(out: Path) -> list[str]:
    return sorted(p.name for p in Path(out).glob("checkpoint*"))


def _single_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message


# -- 1. incomplete stores ------------------------------------------------------------------------
def test_incomplete_train_store_is_refused_before_training(stores, tmp_path):
    target = stores["partial", "train"]
    seen = []
    with pytest.raises(StoreError) as info:
        fit(_config(stores, tmp_path / "run", target=target), seen.append)
    message = str(info.value)
    _single_line(message)
    assert target in message
    assert "2 of 5 shards have no completion marker" in message
    assert "extract" in message and "--allow-incomplete" in message
    assert seen == [] and not (tmp_path / "run" / "history.csv").exists()
    assert _checkpoint_files(tmp_path / "run") == []


def test_allow_incomplete_trains_on_marked_shards_and_reports_rows(stores, tmp_path):
    target = _unmarked_copy(stores["clip-tiny", "train"], tmp_path / "target.zarr", [1, 3])
    config = _config(
        stores,
        tmp_path / "run",
        target=target,
        target_test=stores["clip-tiny", "test"],
        allow_incomplete=True,
    )
    recipe = StitchRecipe(config)
    used = np.concatenate([recipe.train_rows, recipe.val_rows])
    assert sorted(used) == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17]  # shards 0, 2, 4
    lines = []
    metrics = recipe.run(log=lines.append)
    assert metrics["train_rows"] == len(recipe.train_rows) and metrics["val_rows"] == 1
    assert metrics["incomplete_stores"] == {
        target: {"unmarked_shards": [1, 3], "num_shards": 5, "rows_used": 10, "num_rows": 18}
    }
    assert any(target in line and "10 of 18 rows" in line for line in lines), lines


def test_allow_incomplete_accepts_a_stopped_extraction(stores, tmp_path):
    config = _config(
        stores,
        tmp_path / "run",
        target=stores["partial", "train"],
        target_test=stores["clip-tiny", "test"],
        allow_incomplete=True,
        epochs=1,
    )
    assert fit(config)["train_rows"] == 9


def test_incomplete_test_store_is_refused_before_training_and_allowed(stores, tmp_path):
    source_test = stores["partial", "test"]  # test rows 4..5 unmarked
    seen = []
    config = _config(stores, tmp_path / "run", source_test=source_test)
    with pytest.raises(StoreError, match=r"1 of 2 shards have no completion marker") as info:
        fit(config, seen.append)
    assert source_test in str(info.value) and seen == []
    allowed = _config(
        stores, tmp_path / "allowed", source_test=source_test, allow_incomplete=True, epochs=1
    )
    metrics = fit(allowed)
    assert metrics["test_images"] == 4
    assert metrics["incomplete_stores"][source_test]["rows_used"] == 4


# -- 2. unreadable shards ------------------------------------------------------------------------
def _corrupt_source(stores, tmp_path) -> str:
    source = _copy(stores["dinov2-tiny", "train"], tmp_path / "source.zarr")
    shard = Path(source) / "layers" / "2" / "c" / "1" / "0" / "0"  # rows 4..7
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    shard.write_bytes(payload)
    return source


@pytest.mark.parametrize("mode", MODES)
def test_checksum_failure_is_a_store_error_naming_store_array_rows(stores, tmp_path, mode):
    source = _corrupt_source(stores, tmp_path)
    config = _config(stores, tmp_path / "run", source=source, memory_budget=MODES[mode])
    with pytest.raises(StoreError) as info:
        fit(config)
    message = str(info.value)
    _single_line(message)
    assert source in message and "layers/2" in message
    assert "shard 1" in message and "rows 4..7" in message
    assert f"featcache verify {source}" in message and "re-extract" in message


def test_cli_reports_a_checksum_failure_in_one_line_with_exit_2(stores, tmp_path):
    source = _corrupt_source(stores, tmp_path)
    args = ["fit", "--source", source, "--target", stores["clip-tiny", "train"]]
    args += ["--position", "2", "--out", str(tmp_path / "run"), "--objective", "ffm"]
    args += ["--lr", "5e-3", "--epochs", "1", "--batch-size", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error:" in result.output and "featcache verify" in result.output


def test_truncated_shard_object_is_refused_before_training(stores, tmp_path):
    source = _copy(stores["dinov2-tiny", "train"], tmp_path / "source.zarr")
    shard = Path(source) / "layers" / "2" / "c" / "1" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-10])
    seen = []
    with pytest.raises(StoreError) as info:
        fit(_config(stores, tmp_path / "run", source=source), seen.append)
    message = str(info.value)
    _single_line(message)
    assert source in message and "shard 1: layers/2" in message
    assert f"featcache verify {source}" in message and seen == []


# -- 3. non-finite features and losses -----------------------------------------------------------
def _plant_nan(url: str, array: str, rows) -> None:
    values = zarr.open_array(str(Path(url) / array), mode="r+")
    for row in rows:
        values[row] = np.nan  # rewrites the shard through zarr: its checksums stay right
    reseal_marker(url)  # and the markers vouch for it: NaN as an encoder would have written it


@pytest.mark.parametrize("mode", MODES)
def test_nan_features_in_valid_rows_stop_the_run_naming_the_rows(stores, tmp_path, mode):
    source = _copy(stores["dinov2-tiny", "train"], tmp_path / "source.zarr")
    config = _config(stores, tmp_path / "run", source=source, memory_budget=MODES[mode])
    train = StitchRecipe(config).train_rows
    planted = [int(r) for r in train if 4 <= r <= 7][:2]  # two train rows of shard 1
    assert len(planted) == 2
    _plant_nan(source, "layers/2", planted)
    assert FeatureStore.open(source).read("valid")[planted].all()
    seen = []
    with pytest.raises(FeatcacheError) as info:
        fit(config, seen.append)
    message = str(info.value)
    _single_line(message)
    assert source in message and "layers/2" in message
    assert f"rows {planted[0]}, {planted[1]}" in message
    epochs = [event for event in seen if event.get("event") == "epoch"]
    assert epochs == [] and _checkpoint_files(tmp_path / "run") == []


def test_nan_features_in_the_test_store_are_refused(stores, tmp_path):
    target_test = _copy(stores["clip-tiny", "test"], tmp_path / "test.zarr")
    _plant_nan(target_test, "pooled", [3])
    config = _config(stores, tmp_path / "run", target_test=target_test, epochs=1)
    with pytest.raises(FeatcacheError, match=r"rows 3\b") as info:
        fit(config)
    assert target_test in str(info.value) and "pooled" in str(info.value)


def test_non_finite_loss_stops_the_run_naming_stage_lr_epoch_rows(stores, tmp_path):
    config = _config(stores, tmp_path / "run", objective="lfm", lrs=(1e30,), stitch="linear")
    with pytest.raises(FeatcacheError) as info:
        fit(config)
    message = str(info.value)
    _single_line(message)
    assert "lfm" in message and "lr 1e+30" in message and "epoch 1:" in message
    assert re.search(r"rows \d+", message) and "finite" in message


# -- 4. resume ------------------------------------------------------------------------------------
RESUME = dict(objective="ffm+tlt", lrs=(1e-3, 5e-3, 1e-2), epochs=2, patience=1, batch_size=8)


class _Snapshotting(StitchRecipe):
    """An uninterrupted run that copies its run dir after every checkpoint write (kill points
    1..K) and at the two stage-boundary points (stage 1 saved; stage 2 not yet started)."""

    def __init__(self, config: FitConfig, where: Path) -> None:
        super().__init__(config, checkpoint_every=0)  # a checkpoint after every epoch
        self.where, self.count = where, 0

    def _save_checkpoint(self, *args, **kwargs):
        super()._save_checkpoint(*args, **kwargs)
        self.count += 1
        shutil.copytree(self.out, self.where / f"k{self.count}")

    def _run_stage(self, stage_index, resume, progress):
        if stage_index == 1:  # stage 1 saved, stage 2 not started
            shutil.copytree(self.out, self.where / "before-stage-2")
        super()._run_stage(stage_index, resume, progress)
        if stage_index == 0:  # stitch-ffm.safetensors and stage-ffm.json written
            shutil.copytree(self.out, self.where / "after-stage-1")


def _outcome(out: Path) -> dict:
    history = history_without_timing(out)
    return {
        "stitch": load_file(str(out / "stitch.safetensors")),
        "head": load_file(str(out / "head.safetensors")),
        "history": history,
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def _assert_same_outcome(got: dict, want: dict, label: str) -> None:
    for name in ("stitch", "head"):
        assert got[name].keys() == want[name].keys(), label
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (label, name, key)
    assert got["history"] == want["history"], label
    assert got["metrics"] == want["metrics"], label
    assert _checkpoint_files(Path(got["out"])) == [], label


@pytest.fixture(scope="module")
def reference(stores, tmp_path_factory):
    """The uninterrupted two-stage run, its outcome and its run dir at every kill point."""
    root = tmp_path_factory.mktemp("reference")
    config = _config(stores, root / "run", **RESUME)
    recipe = _Snapshotting(config, root)
    recipe.run()
    outcome = _outcome(root / "run")
    assert len(outcome["history"]) == 12  # 2 stages x 3 lrs x 2 epochs (no early stop here)
    return {"config": config, "outcome": outcome, "root": root, "checkpoints": recipe.count}


def _resume_from(reference, snapshot: str) -> dict:
    out = Path(reference["config"].out)
    shutil.rmtree(out)
    shutil.copytree(reference["root"] / snapshot, out)
    fit(reference["config"])
    return {**_outcome(out), "out": out}


def test_resume_is_exact_after_every_checkpoint(reference):
    count = reference["checkpoints"]
    assert count == 18  # per stage and lr: 2 epoch checkpoints + 1 at the lr boundary
    for k in range(1, count + 1):
        _assert_same_outcome(_resume_from(reference, f"k{k}"), reference["outcome"], f"k={k}")


@pytest.mark.parametrize("snapshot", ["after-stage-1", "before-stage-2"])
def test_resume_is_exact_at_the_stage_boundary(reference, snapshot):
    _assert_same_outcome(_resume_from(reference, snapshot), reference["outcome"], snapshot)


class _StoppedAfter(StitchRecipe):
    """Epoch checkpoints by the clock only (never, at ``checkpoint_every=inf``); the run stops
    with an exception, as a kill would, after its ``stop_after``-th epoch."""

    def __init__(self, config: FitConfig, stop_after: int, checkpoint_every: float) -> None:
        super().__init__(config, checkpoint_every=checkpoint_every)
        self.stop_after, self.epochs, self.writes = stop_after, 0, 0

    def _save_checkpoint(self, *args, **kwargs):
        super()._save_checkpoint(*args, **kwargs)
        self.writes += 1

    def _train_epoch(self, *args, **kwargs):
        row = super()._train_epoch(*args, **kwargs)
        self.epochs += 1
        if self.epochs == self.stop_after:
            raise KeyboardInterrupt("stopped")
        return row


def test_checkpoint_interval_writes_at_learning_rate_boundaries_and_resume_is_exact(
    reference, tmp_path
):
    """``checkpoint_every``: epoch checkpoints only once that many seconds have passed; the
    learning-rate boundaries are always written. Stopped two epochs into stage 2's second
    learning rate, the run resumes from that lr's start and ends as the uninterrupted one."""
    config = FitConfig(**{**reference["config"].__dict__, "out": str(tmp_path / "run")})
    whole = _StoppedAfter(
        FitConfig(**{**config.__dict__, "out": str(tmp_path / "whole")}), 0, math.inf
    )
    whole.run()
    assert whole.writes == 6  # 2 stages x 3 lrs: the lr boundaries only, no epoch checkpoint
    stopped = _StoppedAfter(config, stop_after=10, checkpoint_every=math.inf)
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    state = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert (state["stage_index"], state["state"]["lr_index"], state["state"]["epoch"]) == (1, 1, 0)
    fit(config)
    got = {**_outcome(tmp_path / "run"), "out": tmp_path / "run"}
    _assert_same_outcome(got, reference["outcome"], "interval")
    _assert_same_outcome({**_outcome(tmp_path / "whole"), "out": tmp_path / "whole"},
                         reference["outcome"], "no epoch checkpoints")  # fmt: skip


def test_checkpoint_interval_must_be_non_negative(reference):
    for bad in (-1, float("nan"), "10"):
        with pytest.raises(FeatcacheError, match=r"--checkpoint-every >= 0 seconds.*Got"):
            StitchRecipe(reference["config"], checkpoint_every=bad)


_KILLED = """
import json, os, signal, sys
import torch
from stitchtrain.pipeline.fit import StitchRecipe
from stitchtrain.train.config import FitConfig
torch.set_num_threads(int(sys.argv[3]))  # as in the reference run: the same float reductions
class Killed(StitchRecipe):
    writes = 0
    def _save_checkpoint(self, *args):
        super()._save_checkpoint(*args)
        Killed.writes += 1
        if Killed.writes == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
Killed(FitConfig(**json.loads(sys.argv[1])), checkpoint_every=0).run()
"""


def _run_script(script: str, config: FitConfig, at: int) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter with argv: the config as JSON, ``at``, and this
    process's torch thread count (the same float reductions as the reference run)."""
    payload = json.dumps({**config.__dict__, "lrs": list(config.lrs)})
    return subprocess.run(
        [sys.executable, "-c", script, payload, str(at), str(torch.get_num_threads())],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_after_a_real_sigkill_is_exact(reference, tmp_path):
    config = FitConfig(**{**reference["config"].__dict__, "out": str(tmp_path / "run")})
    # checkpoint 3 is written when the first FFM learning rate finishes: the next one must
    # start fresh, not from the finished one's stitch, head and optimiser
    done = _run_script(_KILLED, config, 3)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "checkpoint.json" in _checkpoint_files(tmp_path / "run")
    fit(config)
    got = {**_outcome(tmp_path / "run"), "out": tmp_path / "run"}
    _assert_same_outcome(got, reference["outcome"], "sigkill")


_TERMINATED = """
import json, os, signal, sys
import torch
from stitchtrain.pipeline.fit import StitchRecipe
from stitchtrain.train.config import FitConfig, FitStopped
torch.set_num_threads(int(sys.argv[3]))
class Terminated(StitchRecipe):
    epochs = 0
    def _train_epoch(self, *args, **kwargs):
        Terminated.epochs += 1
        if Terminated.epochs == int(sys.argv[2]):  # the scheduler's SIGTERM, mid-epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return super()._train_epoch(*args, **kwargs)
try:
    Terminated(FitConfig(**json.loads(sys.argv[1])), checkpoint_every=float("inf")).run()
except FitStopped as err:
    print(err)
    sys.exit(err.exit_code)
"""


def test_sigterm_checkpoints_the_epoch_in_progress_and_resume_is_exact(reference, tmp_path):
    """A SIGTERM (a batch scheduler preempting the job) lets the epoch in progress finish,
    writes a checkpoint even when none is due and stops with exit status 143; the same command
    then ends as the uninterrupted run."""
    config = FitConfig(**{**reference["config"].__dict__, "out": str(tmp_path / "run")})
    done = _run_script(_TERMINATED, config, 9)
    assert done.returncode == 143, done.stderr
    assert "Stopped by SIGTERM after epoch 1 of stage tlt, lr 0.005" in done.stdout
    state = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert (state["stage_index"], state["state"]["lr_index"], state["state"]["epoch"]) == (1, 1, 1)
    fit(config)
    got = {**_outcome(tmp_path / "run"), "out": tmp_path / "run"}
    _assert_same_outcome(got, reference["outcome"], "sigterm")


def test_fit_stopped_exits_143_from_the_cli(monkeypatch, tmp_path):
    import stitchtrain.pipeline.fit as fit_module
    from stitchtrain.train.config import FitStopped

    def stopped(*args, **kwargs):
        raise FitStopped("Stopped by SIGTERM after epoch 1 of stage ffm, lr 0.001: ...")

    monkeypatch.setattr(fit_module, "fit", stopped)
    args = ["fit", "--source", "a", "--target", "b", "--position", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 143, result.output
    assert "Stopped by SIGTERM" in result.output and "Traceback" not in result.output


def test_finished_run_dir_returns_saved_metrics_without_training(stores, tmp_path):
    config = _config(stores, tmp_path / "run", epochs=1)
    metrics = fit(config)
    stitch_file = tmp_path / "run" / "stitch.safetensors"
    written = stitch_file.stat().st_mtime_ns
    steps, seen = [], []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: steps.append(1))
    try:
        again = fit(config, seen.append)
    finally:
        handle.remove()
    assert again == metrics == json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert steps == [] and seen == [] and stitch_file.stat().st_mtime_ns == written
    with pytest.raises(FeatcacheError, match="different config"):
        fit(_config(stores, tmp_path / "run", epochs=2))
    # a run dir from before allow_incomplete existed: the missing field counts as its default
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["allow_incomplete"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert fit(config) == metrics


# -- 5. checkpoint format -------------------------------------------------------------------------
def test_checkpoint_is_safetensors_plus_json_and_checked_on_resume(reference):
    config, out = reference["config"], Path(reference["config"].out)
    shutil.rmtree(out)
    shutil.copytree(reference["root"] / "k16", out)  # inside the last TLT learning rate
    manifest = json.loads((out / "checkpoint.json").read_text())
    tensors = out / manifest["tensors"]["file"]
    assert _checkpoint_files(out) == sorted(["checkpoint.json", tensors.name])
    assert tensors.suffix == ".safetensors"
    assert hashlib.sha256(tensors.read_bytes()).hexdigest() == manifest["tensors"]["sha256"]
    assert any(key.startswith("training/optimizer/") for key in load_file(str(tensors)))

    # a tensors file whose bytes differ from what the JSON names is refused
    original = tensors.read_bytes()
    tensors.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(FeatcacheError, match="checkpoint.json") as info:
        fit(config)
    _single_line(str(info.value))
    tensors.write_bytes(original)

    # killed between the two writes: a newer tensors file that no JSON names yet is ignored
    (out / "checkpoint-0123456789abcdef.safetensors").write_bytes(b"half-written")
    fit(config)
    _assert_same_outcome({**_outcome(out), "out": out}, reference["outcome"], "orphan")


# -- the linear probe reads stores the same way ----------------------------------------------------
def test_probe_refuses_an_incomplete_store(stores, tmp_path):
    from stitchtrain.scoring.probe import probe_store

    with pytest.raises(StoreError, match=r"2 of 5 shards have no completion marker"):
        probe_store(
            stores["partial", "train"],
            str(tmp_path / "probe"),
            test_store=stores["clip-tiny", "test"],
            epochs=1,
        )
    assert not (tmp_path / "probe" / "metrics.json").exists()


def test_probe_refuses_nan_pooled_features_in_valid_rows(stores, tmp_path):
    from stitchtrain.scoring.probe import probe_store

    copy = _copy(stores["dinov2-tiny", "train"], tmp_path / "nan.zarr")
    zarr.open_array(f"{copy}/pooled", mode="r+")[5] = np.nan
    reseal_marker(copy, 1)
    with pytest.raises(StoreError, match=r"pooled, rows 5 instead"):
        probe_store(
            copy, str(tmp_path / "probe"), test_store=stores["dinov2-tiny", "test"], epochs=1
        )
