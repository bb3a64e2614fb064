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
import torch
from conftest import extract_demo_stores, pair_fit_config
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

import featcache
from cli.stitchtrain_app import app
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore
from stitchtrain.pipeline.fit import fit
from stitchtrain.pipeline.plan import FitPlan, plan_fit
from stitchtrain.train.config import FitConfig


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
    defaults = dict(lrs=(5e-3,), epochs=30, patience=30, device="cpu")
    return pair_fit_config(stores, out, **{**defaults, **overrides})


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
    (out / "checkpoint.json").write_text("{}")  # resume would refuse it: so does the plan
    with pytest.raises(FeatcacheError, match="Cannot resume from .* no digest"):
        plan_fit(config)
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


def _write_sweep_config(path, stores, *, probe: bool, fit: str = "") -> None:
    """dinov2-tiny -> clip-tiny FFM at positions 2 (stored) and 3 (not), no self-stitches,
    probes or not; ``fit``: more [fit] lines."""
    path.write_text(
        f"""
[stores]
dinov2 = "{stores["dinov2-tiny", "train"]}"
clip = "{stores["clip-tiny", "train"]}"

[grid]
pairs = [["dinov2", "clip"]]
positions = [2, 3]
objectives = ["ffm"]

[baselines]
probe = {str(probe).lower()}
self_stitch = false

[fit]
lrs = [5e-3]
epochs = 3
batch_size = 8
device = "cpu"
{fit}
"""
    )


def test_sweep_points_plan_with_fit_plan(stores, tmp_path):
    from cli.experiments_app import experiments_app
    from stitchtrain.studies.sweep.config import load_sweep_config
    from stitchtrain.studies.sweep.grid import plan_sweep

    _write_sweep_config(tmp_path / "sweep.toml", stores, probe=False)
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


def test_sweep_dry_run_json_prints_each_points_fit_plan(stores, tmp_path):
    """``sweep --dry-run --json``: per point the object ``fit --dry-run --json`` prints."""
    from cli.experiments_app import experiments_app
    from stitchtrain.studies.sweep.config import load_sweep_config
    from stitchtrain.studies.sweep.grid import plan_sweep

    _write_sweep_config(tmp_path / "sweep.toml", stores, probe=True, fit='memory_budget = "1GB"')
    out = tmp_path / "sweep"
    args = ["sweep", str(tmp_path / "sweep.toml"), "--out", str(out), "--dry-run", "--json"]
    with counted_steps() as steps:
        result = CliRunner().invoke(experiments_app, args)
    assert result.exit_code == 0, result.output
    assert steps == [] and not out.exists()
    points = {entry["id"]: entry for entry in json.loads(result.output)}
    plan = plan_sweep(load_sweep_config(tmp_path / "sweep.toml"), base=tmp_path)
    assert sorted(points) == sorted(p.id for p in plan.points)
    for point in plan.points:
        entry = points[point.id]
        assert entry["kind"] == point.kind and entry["done"] is False
        if point.kind == "probe":
            assert entry["plan"] is None and entry["refused"] is None
        elif point.position == 3:
            assert entry["plan"] is None and "layers/3" in entry["refused"]
        else:
            assert entry["refused"] is None
            assert entry["plan"] == plan_fit(point.fit_config(out)).to_dict()
            fit_args = ["fit", "--source", point.config["source"], "--target"]
            fit_args += [point.config["target"], "--position", "2", "--objective", "ffm"]
            fit_args += ["--out", str(point.run_dir(out)), "--lr", "5e-3", "--epochs", "3"]
            fit_args += ["--batch-size", "8", "--device", "cpu", "--memory-budget", "1GB"]
            fit_args += ["--dry-run", "--json"]
            from_fit = CliRunner().invoke(app, fit_args)
            assert from_fit.exit_code == 0, from_fit.output
            assert json.loads(from_fit.output) == entry["plan"]


# -- tree build: every run dir, store and the tree dir before an encoder loads ---------------------
@pytest.fixture(scope="module")
def ffm_run(stores, tmp_path_factory):
    """A finished FFM run dinov2-tiny -> clip-tiny at position 2 (tree's and transfer's input)."""
    out = tmp_path_factory.mktemp("ffm-run") / "run"
    fit(_config(stores, out, objective="ffm", epochs=1, patience=1))
    return out


@contextlib.contextmanager
def counted_loads(monkeypatch):
    """Count every encoder load (the expensive work of tree build) inside the block."""
    import stitchtrain.train.encoders
    import stitchtrain.tree.runs

    loads = []
    real = stitchtrain.tree.runs.load_encoder

    def load(name, *args, **kwargs):
        loads.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(stitchtrain.tree.runs, "load_encoder", load)
    monkeypatch.setattr(stitchtrain.train.encoders, "load_encoder", load)
    yield loads


def _run_copy(run: Path, to: Path, **config) -> Path:
    """A copy of run dir ``run`` with ``config`` fields replaced in its config.json."""
    shutil.copytree(run, to)
    saved = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**saved, **config}))
    return to


def _tree_refused(monkeypatch, args: list[str], match: str, loads_allowed: int = 0) -> None:
    with counted_loads(monkeypatch) as loads:
        result = CliRunner().invoke(app, ["tree", "build", "--trunk", "dinov2-tiny", *args])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert match in output, output
    assert len(loads) <= loads_allowed, loads


def _tree_args(out: Path, *branches: Path, position: int = 2) -> list[str]:
    args = ["--position", str(position), "--out", str(out)]
    for branch in branches:
        args += ["--branch", str(branch)]
    return args


def test_tree_build_refuses_an_unfinished_run_before_loading(ffm_run, tmp_path, monkeypatch):
    late = _run_copy(ffm_run, tmp_path / "late")
    (late / "stitch.safetensors").unlink()
    _tree_refused(monkeypatch, _tree_args(tmp_path / "tree", ffm_run, late), "has not finished")


def test_tree_build_refuses_a_run_at_another_position_before_loading(
    ffm_run, tmp_path, monkeypatch
):
    other = _run_copy(ffm_run, tmp_path / "other", position=3)
    _tree_refused(monkeypatch, _tree_args(tmp_path / "tree", ffm_run, other), "position 3")


def test_tree_build_refuses_a_missing_store_before_loading(ffm_run, tmp_path, monkeypatch):
    gone = _run_copy(ffm_run, tmp_path / "gone", target=str(tmp_path / "no-such.zarr"))
    _tree_refused(monkeypatch, _tree_args(tmp_path / "tree", ffm_run, gone), "cannot be opened")


def test_tree_build_refuses_a_geometry_mismatch_before_loading(
    stores, ffm_run, tmp_path, monkeypatch
):
    cropped = _run_copy(ffm_run, tmp_path / "cropped", target=stores["cropped", "train"])
    _tree_refused(monkeypatch, _tree_args(tmp_path / "tree", ffm_run, cropped), "geometr")


def test_tree_build_refuses_runs_of_two_trunks_before_loading(
    stores, ffm_run, tmp_path, monkeypatch
):
    clip = stores["clip-tiny", "train"]
    other = _run_copy(ffm_run, tmp_path / "other", source=clip, target=clip)
    _tree_refused(monkeypatch, _tree_args(tmp_path / "tree", ffm_run, other), "one tree has one")


def test_tree_build_refuses_stitch_weights_that_do_not_fit_before_loading(
    ffm_run, tmp_path, monkeypatch
):
    bad = _run_copy(ffm_run, tmp_path / "bad")
    save_file({"weight": torch.zeros(3, 3)}, str(bad / "stitch.safetensors"))
    _tree_refused(monkeypatch, _tree_args(tmp_path / "tree", ffm_run, bad), "does not fit")


def test_tree_build_refuses_an_existing_tree_before_loading(ffm_run, tmp_path, monkeypatch):
    out = tmp_path / "tree"
    out.mkdir()
    (out / "tree.json").write_text("{}")
    _tree_refused(monkeypatch, _tree_args(out, ffm_run), "already holds a tree")
    file = tmp_path / "file"
    file.write_text("")
    _tree_refused(monkeypatch, _tree_args(file, ffm_run), "Got the file")


def test_tree_build_refuses_a_readout_layer_past_the_depth_before_loading(
    ffm_run, tmp_path, monkeypatch
):
    args = [*_tree_args(tmp_path / "tree", ffm_run), "--readout-layer", "7"]  # depth 6
    _tree_refused(monkeypatch, args, "3..6")


def test_tree_build_refuses_a_bad_device_before_loading(ffm_run, tmp_path, monkeypatch):
    args = [*_tree_args(tmp_path / "tree", ffm_run), "--device", "tpu"]
    _tree_refused(monkeypatch, args, "device")


def test_tree_build_refuses_a_trunk_of_other_weights_before_any_branch_loads(
    stores, ffm_run, tmp_path, monkeypatch
):
    """The trunk's fingerprint needs the trunk loaded: that one load, no branch's."""
    clip_run = _run_copy(ffm_run, tmp_path / "clip")
    args = ["--trunk", "clip-tiny", *_tree_args(tmp_path / "tree", clip_run)]
    with counted_loads(monkeypatch) as loads:
        result = CliRunner().invoke(app, ["tree", "build", *args])
    assert result.exit_code == 2 and "fingerprint" in result.output, result.output
    assert loads == ["clip-tiny"]
    assert not (tmp_path / "tree").exists()


# -- transfer: every input before the probe's first step -----------------------------------------
def _transfer_refused(ffm_run, tmp_path, match: str, run=None, **kwargs) -> None:
    from stitchtrain.studies.analysis import transfer_run

    arguments = dict(
        source=kwargs.pop("source", None),
        target=kwargs.pop("target", None),
        out=kwargs.pop("out", tmp_path / "transfer"),
        epochs=2,
        device=kwargs.pop("device", "cpu"),
        **kwargs,
    )
    with counted_steps() as steps, pytest.raises(FeatcacheError, match=match) as info:
        transfer_run(run or ffm_run, **arguments)
    assert steps == [], f"{len(steps)} optimiser steps before the error"
    assert "\n" not in str(info.value)


@pytest.fixture()
def other(stores):
    """The other dataset's train stores (the transfer's inputs), dinov2-tiny -> clip-tiny."""
    return dict(source=stores["other", "dinov2-tiny"], target=stores["other", "clip-tiny"])


def test_transfer_refuses_a_run_without_ffm_before_training(ffm_run, other, tmp_path):
    run = _run_copy(ffm_run, tmp_path / "lfm", objective="lfm")
    (run / "stitch-ffm.safetensors").unlink()
    _transfer_refused(ffm_run, tmp_path, "stitch-ffm", run=run, **other)


def test_transfer_refuses_missing_test_stores_before_training(ffm_run, stores, tmp_path):
    source, target = stores["no-test", "dinov2-tiny"], stores["no-test", "clip-tiny"]
    _transfer_refused(ffm_run, tmp_path, "'test'", source=source, target=target)


def test_transfer_refuses_an_incomplete_test_store_before_training(ffm_run, stores, tmp_path):
    copy = tmp_path / "partial.zarr"
    shutil.copytree(stores["clip-tiny", "test"], copy)
    Path(FeatureStore.open(str(copy))._marker_path(0)).unlink()
    _transfer_refused(
        ffm_run,
        tmp_path,
        "completion marker",
        source=stores["dinov2-tiny", "train"],
        target=stores["clip-tiny", "train"],
        source_test=stores["dinov2-tiny", "test"],
        target_test=str(copy),
    )


def test_transfer_refuses_unpaired_stores_before_training(ffm_run, stores, other, tmp_path):
    target = stores["clip-tiny", "train"]
    _transfer_refused(ffm_run, tmp_path, "dataset|ids|pair", source=other["source"], target=target)


def test_transfer_refuses_a_geometry_mismatch_before_training(ffm_run, stores, tmp_path):
    source, target = stores["dinov2-tiny", "train"], stores["cropped", "train"]
    _transfer_refused(ffm_run, tmp_path, "geometr", source=source, target=target)


def test_transfer_refuses_a_position_the_stores_lack_before_training(ffm_run, other, tmp_path):
    run = _run_copy(ffm_run, tmp_path / "at3", position=3)
    _transfer_refused(ffm_run, tmp_path, "layers/3|position", run=run, **other)


def test_transfer_refuses_stores_of_another_encoder_before_training(ffm_run, stores, tmp_path):
    source = target = stores["other", "dinov2-tiny"]
    _transfer_refused(ffm_run, tmp_path, "fingerprint", source=source, target=target)


def test_transfer_refuses_its_out_dir_before_training(ffm_run, other, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    _transfer_refused(ffm_run, tmp_path, "Got the file", out=file, **other)
    _transfer_refused(ffm_run, tmp_path, "run dir", out=ffm_run, **other)


@pytest.mark.parametrize("budget", ["lots", "-1GB"])
def test_transfer_refuses_a_bad_memory_budget_before_training(ffm_run, other, tmp_path, budget):
    _transfer_refused(ffm_run, tmp_path, "memory", memory_budget=budget, **other)


def test_transfer_refuses_a_bad_device_before_training(ffm_run, other, tmp_path):
    _transfer_refused(ffm_run, tmp_path, "device", device="tpu", **other)
    assert not (tmp_path / "transfer").exists()


# -- the plan's memory estimate -------------------------------------------------------------------
def _saved_bytes(module, run) -> int:
    """Bytes autograd saves for backward while ``run()`` runs, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in parameters:
            storages[key] = max(storages.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def test_block_saved_count_matches_a_frozen_timm_tail():
    """BLOCK_SAVED (10 floats per token and channel) is what autograd keeps per frozen block."""
    from stitchtrain.pipeline.plan import BLOCK_SAVED

    encoder = featcache.load_encoder("dinov2-tiny")  # timm ViT blocks, frozen
    batch, tokens, width = 4, 1 + 64, encoder.width
    for position in (2, 4):
        x = torch.randn(batch, tokens, width, requires_grad=True)
        blocks = encoder.depth - position
        saved = _saved_bytes(encoder.module, lambda x=x, n=position: encoder.run_from(x, n))
        estimate = 4 * batch * tokens * width * (BLOCK_SAVED * blocks + 1)  # + final norm
        assert estimate <= saved <= 1.06 * estimate, (position, saved, estimate)


_PEAK_SCRIPT = """
import json, sys
import psutil, torch
import featcache._compat
import timm
torch.set_num_threads(1)
batch, tokens, blocks = 32, 65, 4
model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, num_classes=0)
model.requires_grad_(False).eval()
tail = torch.nn.Sequential(*model.blocks[:blocks], model.norm)
x = torch.randn(batch, tokens, model.embed_dim, requires_grad=True)
target = torch.randn(batch, tokens, model.embed_dim)
def step():
    torch.nn.functional.mse_loss(tail(x), target).backward()
    x.grad = None
def high_water_mark():
    status = open("/proc/self/status").read()
    return int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
step()
base = psutil.Process().memory_info().rss
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS (Linux)
    f.write("5")
step()
print(json.dumps({"measured": high_water_mark() - base, "width": model.embed_dim}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="glibc malloc on Linux")
def test_tail_activation_estimate_is_within_a_factor_of_the_measured_peak():
    """ViT-S tail (4 blocks, 32 x 65 tokens): the estimate within 1.3x of the peak RSS growth
    of a forward + backward (glibc told to return freed memory at once, so RSS follows; the
    peak is the kernel's VmHWM, reset just before the step, so start-up peaks do not count)."""
    import os
    import subprocess
    import sys

    from stitchtrain.pipeline.plan import tail_activation_bytes

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    estimate = tail_activation_bytes(32, 65, result["width"], 4) + 4 * 32 * 65 * 384 * 3
    assert estimate / 1.3 <= result["measured"] <= estimate * 1.3, (result, estimate)


def test_plan_memory_counts_activations_and_optimiser_state(stores, tmp_path):
    from stitchtrain.pipeline.fit import StitchRecipe
    from stitchtrain.pipeline.plan import step_memory, tail_activation_bytes

    config = _config(stores, tmp_path / "run", batch_size=16)
    plan = plan_fit(config)
    recipe = StitchRecipe(config)
    assert set(plan.activation_bytes) == set(plan.optimiser_bytes) == {"ffm", "tlt"}
    for stage in ("ffm", "tlt"):
        trainable = sum(p.numel() for p in recipe._trainable(stage))
        assert plan.optimiser_bytes[stage] == 12 * trainable  # exp_avg, exp_avg_sq, grad
        assert (plan.activation_bytes[stage], plan.optimiser_bytes[stage]) == step_memory(
            recipe, stage
        )
    clip = recipe.target.attrs["encoder"]  # 8x8 grid + CLS, the tail after layer 2
    tail = tail_activation_bytes(16, 65, clip["width"], clip["depth"] - 2)
    assert plan.activation_bytes["ffm"] > tail
    assert plan.optimiser_bytes["tlt"] > plan.optimiser_bytes["ffm"]  # + the head
    worst = max(plan.activation_bytes[s] + plan.optimiser_bytes[s] for s in ("ffm", "tlt"))
    assert plan.peak_bytes == plan.staged_bytes + plan.model_bytes + worst
    doubled = plan_fit(_config(stores, tmp_path / "run", batch_size=32))
    assert doubled.activation_bytes["ffm"] == 2 * plan.activation_bytes["ffm"]


def test_tree_build_refuses_a_missing_weights_file_before_loading(ffm_run, tmp_path, monkeypatch):
    missing = tmp_path / "clip.safetensors"
    args = [*_tree_args(tmp_path / "tree", ffm_run), "--weights", f"clip-tiny={missing}"]
    _tree_refused(monkeypatch, args, "No weights file")
