"""``stitchtrain fit`` fails before its first optimiser step, and ``fit --dry-run`` plans.

Every input that can be known before training (train and test stores, pairing and geometry,
position, target weights fingerprint, run dir state, memory budget, device) is checked before
the first step: each test below counts optimiser steps globally and expects none.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import extract_demo_stores
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

import featcache
from cli.stitchtrain_app import app
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore
from stitchtrain.fit import FitConfig, fit
from stitchtrain.plan import FitPlan, plan_fit


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split): url} of dinov2-tiny and clip-tiny (layer 2, 18 train / 6 test rows),
    plus ("no-test", model): copies of the train stores with no test split next to them,
    ("other", model): the same models on another dataset, ("cropped", "train"): clip-tiny
    extracted with another crop (geometry)."""
    root = tmp_path_factory.mktemp("failfast")
    models = ["dinov2-tiny", "clip-tiny"]
    urls = extract_demo_stores(
        root / "data", root / "stores", models=models, layers=[2], shard_size=4
    )
    other = extract_demo_stores(
        root / "data-other", root / "other", models=models, layers=[2], shard_size=4, per_class=6
    )
    for model in models:
        url = urls[model, "train"]
        copy = root / "no-test" / "train" / Path(url).name
        shutil.copytree(url, copy)
        urls["no-test", model] = str(copy)
        urls["other", model] = other[model, "train"]
    config = ExtractConfig(
        models=["clip-tiny"],
        data=FeatureStore.open(urls["clip-tiny", "train"]).attrs["dataset"]["source"],
        out=str(root / "cropped"),
        layers=[2],
        split="train",
        shard_size=4,
        crop_pct=0.7,
    )
    plan = plan_extraction(config)
    run_extraction(plan)
    urls["cropped", "train"] = plan.urls[0]
    return urls


def _config(stores, out, **overrides) -> FitConfig:
    defaults = dict(
        source=stores["dinov2-tiny", "train"],
        target=stores["clip-tiny", "train"],
        position=2,
        out=str(out),
        objective="ffm+tlt",
        lrs=(5e-3,),
        epochs=30,
        patience=30,
        batch_size=8,
        device="cpu",
    )
    return FitConfig(**{**defaults, **overrides})


@contextlib.contextmanager
def counted_steps():
    """Count every optimiser step taken inside the block (all optimisers)."""
    steps = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: steps.append(1))
    try:
        yield steps
    finally:
        handle.remove()


def _refused(make_config, match: str, error=FeatcacheError) -> str:
    """Run fit on ``make_config()`` (built inside the count: FitConfig checks count too);
    expect ``error`` matching ``match`` and no optimiser step."""
    with counted_steps() as steps, pytest.raises(error, match=match) as info:
        fit(make_config())
    assert steps == [], f"{len(steps)} optimiser steps before the error"
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_test_store_is_refused_before_training(stores, tmp_path):
    source, target = stores["no-test", "dinov2-tiny"], stores["no-test", "clip-tiny"]
    _refused(lambda: _config(stores, tmp_path / "run", source=source, target=target), "'test'")
    assert not (tmp_path / "run").exists()


def test_missing_test_store_cli_exits_before_training(stores, tmp_path):
    """The issue's command: --objective ffm+tlt --epochs 30, no test split extracted."""
    args = [
        "fit",
        "--source",
        stores["no-test", "dinov2-tiny"],
        "--target",
        stores["no-test", "clip-tiny"],
        "--position",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--objective",
        "ffm+tlt",
        "--epochs",
        "30",
        "--lr",
        "5e-3",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]
    with counted_steps() as steps:
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "No complete 'test' store" in " ".join(result.output.split())
    assert steps == []
    assert not (tmp_path / "run").exists()


def test_incomplete_train_store_is_refused_before_training(stores, tmp_path):
    copy = tmp_path / "partial.zarr"
    shutil.copytree(stores["clip-tiny", "train"], copy)
    store = FeatureStore.open(str(copy))
    (Path(store._marker_path(1))).unlink()
    _refused(lambda: _config(stores, tmp_path / "run", target=str(copy)), "completion marker")


def test_unpaired_stores_are_refused_before_training(stores, tmp_path):
    target = stores["other", "clip-tiny"]
    _refused(lambda: _config(stores, tmp_path / "run", target=target), "dataset|ids|pair")


def test_geometry_mismatch_is_refused_before_training(stores, tmp_path):
    target = stores["cropped", "train"]
    _refused(lambda: _config(stores, tmp_path / "run", target=target), "geometr")


@pytest.mark.parametrize("position", [0, 3, 99])
def test_position_out_of_range_is_refused_before_training(stores, tmp_path, position):
    _refused(lambda: _config(stores, tmp_path / "run", position=position), "position|layers/")


def test_target_fingerprint_mismatch_is_refused_before_training(stores, tmp_path):
    clip = featcache.load_encoder("clip-tiny")
    state = {k: v.clone().contiguous() for k, v in clip.module.state_dict().items()}
    state["ln_post.weight"][0] += 1.0
    weights = tmp_path / "other.safetensors"
    save_file(state, str(weights))
    _refused(lambda: _config(stores, tmp_path / "run", target_weights=str(weights)), "fingerprint")


def test_run_dir_of_another_config_is_refused_before_training(stores, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = _config(stores, out, lrs=(1e-2,))
    (out / "config.json").write_text(json.dumps(asdict(other)))
    message = _refused(lambda: _config(stores, out), "different config")
    assert "lrs" in message


@pytest.mark.parametrize("budget", ["lots", "-1GB"])
def test_bad_memory_budget_is_refused_before_training(stores, tmp_path, budget):
    _refused(lambda: _config(stores, tmp_path / "run", memory_budget=budget), "memory")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
def test_bad_device_is_refused_before_training(stores, tmp_path, device):
    _refused(lambda: _config(stores, tmp_path / "run", device=device), "device")
    assert not (tmp_path / "run").exists()


# -- fit --dry-run --------------------------------------------------------------------------------
def test_plan_of_a_fresh_run(stores, tmp_path):
    out = tmp_path / "run"
    with counted_steps() as steps:
        plan = plan_fit(_config(stores, out, lrs=(1e-3, 5e-3)))
    assert steps == [] and not out.exists()
    assert isinstance(plan, FitPlan)
    assert plan.stages == ["ffm", "tlt"]
    assert plan.lrs == [1e-3, 5e-3] and plan.epochs == 30 and plan.patience == 30
    assert plan.batch_size == {"ffm": 8, "tlt": 8}
    assert plan.train_rows + plan.val_rows == 18 and plan.test_rows == 6
    assert plan.run_dir == "fresh" and plan.device == "cpu"
    per_stage = -(-plan.train_rows // 8)
    assert plan.max_steps == 30 * per_stage * 2 * 2
    assert set(plan.loaders) == {"ffm/train", "ffm/val", "tlt/train", "tlt/val", "test"}
    assert all(loader["mode"] == "staged" for loader in plan.loaders.values())
    assert plan.staged_bytes == sum(loader["bytes"] for loader in plan.loaders.values()) > 0
    json.dumps(plan.to_dict())


def test_plan_streams_under_a_small_budget(stores, tmp_path):
    plan = plan_fit(_config(stores, tmp_path / "run", memory_budget="1"))
    assert all(loader["mode"] == "streamed" for loader in plan.loaders.values())
    assert plan.staged_bytes == 0


def test_plan_checks_inputs(stores, tmp_path):
    source, target = stores["no-test", "dinov2-tiny"], stores["no-test", "clip-tiny"]
    with pytest.raises(FeatcacheError, match="'test'"):
        plan_fit(_config(stores, tmp_path / "run", source=source, target=target))


def test_plan_run_dir_states(stores, tmp_path):
    out = tmp_path / "run"
    config = _config(stores, out, objective="ffm", epochs=1, patience=1)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(asdict(config)))
    (out / "checkpoint.json").write_text("{}")
    assert plan_fit(config).run_dir == "resumable"
    (out / "checkpoint.json").unlink()
    (out / "metrics.json").write_text("{}")
    assert plan_fit(config).run_dir == "finished"


def test_cli_dry_run_prints_the_plan_and_exits(stores, tmp_path):
    out = tmp_path / "run"
    args = [
        "fit",
        "--source",
        stores["dinov2-tiny", "train"],
        "--target",
        stores["clip-tiny", "train"],
        "--position",
        "2",
        "--out",
        str(out),
        "--epochs",
        "30",
        "--device",
        "cpu",
        "--dry-run",
    ]
    with counted_steps() as steps:
        table = CliRunner().invoke(app, args)
        as_json = CliRunner().invoke(app, [*args, "--json"])
    assert steps == [] and not out.exists()
    assert table.exit_code == 0, table.output
    for word in ("ffm", "tlt", "staged", "fresh", "steps"):
        assert word in table.output
    assert as_json.exit_code == 0, as_json.output
    plan = json.loads(as_json.output)
    assert plan["stages"] == ["ffm", "tlt"] and plan["run_dir"] == "fresh"
    assert plan["batch_size"] == {"ffm": 128, "tlt": 128}
    assert plan["max_steps"] == 30 * 1 * 3 * 2


def test_sweep_points_plan_with_fit_plan(stores, tmp_path):
    from cli.experiments_app import experiments_app
    from stitchtrain.sweep import load_sweep_config, plan_sweep

    (tmp_path / "sweep.toml").write_text(
        f"""
[stores]
dinov2 = "{stores["dinov2-tiny", "train"]}"
clip = "{stores["clip-tiny", "train"]}"

[grid]
pairs = [["dinov2", "clip"]]
positions = [2, 3]
objectives = ["ffm"]

[baselines]
probe = false
self_stitch = false

[fit]
lrs = [5e-3]
epochs = 3
batch_size = 8
device = "cpu"
"""
    )
    out = tmp_path / "sweep"
    plan = plan_sweep(load_sweep_config(tmp_path / "sweep.toml"), base=tmp_path)
    good = [p for p in plan.points if p.position == 2]
    bad = [p for p in plan.points if p.position == 3]
    assert len(good) == len(bad) == 2
    with counted_steps() as steps:
        for point in good:
            fit_plan = point.fit_plan(out)
            again = plan_fit(point.fit_config(out))
            again.memory_budget = fit_plan.memory_budget  # the default: a share of free RAM
            assert fit_plan == again
            assert fit_plan.run_dir == "fresh" and fit_plan.stages == ["ffm"]
            assert fit_plan.max_steps == 3 * -(-fit_plan.train_rows // 8)
        for point in bad:
            with pytest.raises(FeatcacheError, match="layers/3"):
                point.fit_plan(out)
        result = CliRunner().invoke(
            experiments_app, ["sweep", str(tmp_path / "sweep.toml"), "--out", str(out), "--dry-run"]
        )
    assert result.exit_code == 0, result.output
    assert "refused" in result.output and "fresh" in result.output
    assert steps == [] and not out.exists()
