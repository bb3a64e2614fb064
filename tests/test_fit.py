"""stitchtrain fit: the paper's objectives trained from stores, checked against live encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import featcache
import stitchtrain.train.encoders as fit_module
from cli.stitchtrain_app import app
from featcache.demo_data import make_demo_dataset
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.images import decode_image
from featcache.store import FeatureStore, StoreSpec
from stitchtrain.data.loader import FeatureLoader
from stitchtrain.data.pairing import PairingError
from stitchtrain.data.positions import PositionError
from stitchtrain.pipeline.fit import StitchRecipe, fit
from stitchtrain.train.config import FitConfig

runner = CliRunner()
MODELS = ["dinov2-tiny", "clip-tiny", "siglip2-tiny"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split, dtype): store url} for 3 classes x 16 images (36 train, 12 test)."""
    root = tmp_path_factory.mktemp("fit")
    manifest = make_demo_dataset(root / "data", num_classes=3, per_class=16)
    urls = {}
    for split in ("train", "test"):
        for dtype in ("float16", "float32"):
            config = ExtractConfig(
                models=MODELS,
                data=str(manifest),
                out=str(root / dtype),
                layers=[1, 2, 3],
                split=split,
                dtype=dtype,
                shard_size=16,
            )
            plan = plan_extraction(config)
            run_extraction(plan)
            for model, url in zip(MODELS, plan.urls, strict=True):
                urls[model, split, dtype] = url
    return urls


def _config(stores, tmp_path, source="dinov2-tiny", target="clip-tiny", dtype="float16", **kw):
    defaults = dict(
        position=2, out=str(tmp_path / "run"), lrs=(5e-3,), epochs=4, patience=3, objective="ffm"
    )
    return FitConfig(
        source=stores[source, "train", dtype],
        target=stores[target, "train", dtype],
        **{**defaults, **kw},
    )


# -- LFM from arrays only -------------------------------------------------------------------------
def _planted_store(stores, tmp_path, weight, bias):
    """A target store whose layer 2 is source layer 2 mapped by (weight, bias)."""
    source = FeatureStore.open(stores["dinov2-tiny", "train", "float32"])
    encoder = {
        **source.attrs["encoder"],
        "name": "planted",
        "fingerprint": "planted",
        "width": weight.shape[1],
        "pooled_width": weight.shape[1],
    }
    spec = StoreSpec(
        encoder=encoder,
        dataset=source.attrs["dataset"],
        layers=(2,),
        dtype="float32",
        shard_size=source.shard_size,
    )
    target = FeatureStore.create(str(tmp_path / "planted.zarr"), spec)
    for shard in range(source.num_shards):
        start, stop = source.shard_rows(shard)
        rows = slice(start, stop)
        layer = source.read("layers/2", rows) @ weight + bias
        arrays = {
            "layers/2": layer,
            "final": np.zeros_like(layer),
            "pooled": np.zeros((stop - start, weight.shape[1]), np.float32),
            "ids": source.read("ids", rows),
            "labels": source.read("labels", rows),
            "valid": source.read("valid", rows),
        }
        target.write_shard(shard, arrays, {"rows": [start, stop], "skipped": []})
    return target.url


def test_lfm_recovers_planted_map_without_encoders(stores, tmp_path, monkeypatch):
    generator = np.random.default_rng(0)
    weight = generator.normal(0, 0.2, size=(96, 48)).astype(np.float32)
    bias = generator.normal(0, 0.1, size=48).astype(np.float32)
    target = _planted_store(stores, tmp_path, weight, bias)

    def no_encoders(*args, **kwargs):
        raise AssertionError("LFM must not load an encoder")

    monkeypatch.setattr(fit_module, "load_encoder", no_encoders)
    config = FitConfig(
        source=stores["dinov2-tiny", "train", "float32"],
        target=target,
        position=2,
        out=str(tmp_path / "run"),
        stitch="linear",
        objective="lfm",
        lrs=(1e-2,),
        epochs=300,
        patience=30,
        batch_size=8,
        val_fraction=0.2,
    )
    recipe = StitchRecipe(config)
    recipe.out.mkdir(parents=True)
    recipe.stage_results = {}
    recipe._run_stage(0, None, None)
    # the map is recovered where the data lives: held-out predictions match to 1%
    source = FeatureStore.open(config.source)
    held_out = torch.from_numpy(source.read("layers/2", recipe.val_rows))
    with torch.no_grad():
        predicted = recipe.stitch(held_out).numpy()
    planted = held_out.numpy() @ weight + bias
    relative = np.linalg.norm(predicted - planted) / np.linalg.norm(planted)
    assert relative < 0.01, relative
    assert recipe.target_encoder is None and recipe.source_encoder is None

    lstsq = StitchRecipe(FitConfig(**{**config.__dict__, "init": "lstsq"}))
    state = lstsq._initial_state(0)
    x = source.read("layers/2", lstsq.train_rows).reshape(-1, 96)
    y = x @ weight + bias
    expected, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)
    np.testing.assert_allclose(state["map.weight"].numpy().T, expected[:-1], atol=1e-4)
    np.testing.assert_allclose(state["map.bias"].numpy(), expected[-1], atol=1e-4)


# -- FFM and TLT through the frozen target tail --------------------------------------------------
def test_ffm_from_stores_equals_live(stores, tmp_path):
    config = _config(stores, tmp_path, dtype="float32", stitch="mlp")
    recipe = StitchRecipe(config)
    loader = FeatureLoader(
        recipe._fields("ffm"), recipe.train_rows[:6], 6, shuffle=False, return_rows=True
    )
    batch = next(iter(loader.epoch(0)))
    cached_loss, _ = recipe._loss("ffm", batch)
    cached_loss.backward()
    cached_grads = [p.grad.clone() for p in recipe.stitch.parameters()]
    recipe.stitch.zero_grad()

    source_encoder = featcache.load_encoder("dinov2-tiny")
    target_encoder = recipe.target_encoder
    records = {r.id: r for r in plan_records(stores)}
    ids = FeatureStore.open(config.source).read("ids")[batch["rows"].numpy()]
    images = [decode_image(records[i].path) for i in ids]
    with torch.no_grad():
        source_layer = source_encoder.run(
            torch.stack([source_encoder.preprocess(im) for im in images]), upto=2
        )
        target_final, _ = target_encoder(
            torch.stack([target_encoder.preprocess(im) for im in images])
        )
    stitched_final, _ = target_encoder.run_from(recipe.stitch(source_layer), 2)
    live_loss = torch.nn.functional.mse_loss(stitched_final, target_final)
    live_loss.backward()
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-5, atol=1e-7)
    for cached, parameter in zip(cached_grads, recipe.stitch.parameters(), strict=True):
        torch.testing.assert_close(cached, parameter.grad, rtol=1e-4, atol=1e-7)


def plan_records(stores):
    source = FeatureStore.open(stores["dinov2-tiny", "train", "float32"])
    from featcache.datasets import load_dataset

    return load_dataset(source.attrs["dataset"]["source"]).records


def test_identity_self_stitch_reproduces_target_final(stores, tmp_path):
    config = _config(
        stores, tmp_path, target="dinov2-tiny", dtype="float32", stitch="linear", init="identity"
    )
    recipe = StitchRecipe(config)
    recipe.stitch.load_state_dict(recipe._initial_state(0))
    target = FeatureStore.open(config.target)
    rows = recipe.val_rows
    source_layer = torch.from_numpy(FeatureStore.open(config.source).read("layers/2", rows))
    with torch.no_grad():
        final, pooled = recipe.stitched_outputs(source_layer)
    torch.testing.assert_close(final, torch.from_numpy(target.read("final", rows)))
    torch.testing.assert_close(pooled, torch.from_numpy(target.read("pooled", rows)))


def test_ffm_then_tlt_beats_chance_and_leaves_target_untouched(stores, tmp_path):
    config = _config(stores, tmp_path, objective="ffm+tlt", epochs=12, stitch="mlp")
    recipe = StitchRecipe(config)
    before = {k: v.clone() for k, v in recipe.target_encoder.state_dict().items()}
    metrics = recipe.run()
    after = recipe.target_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in recipe.target_encoder.parameters())
    assert metrics["test_accuracy"] > 0.6  # 3 classes: chance is 1/3
    history = (tmp_path / "run" / "history.csv").read_text()
    assert "ffm," in history and "tlt," in history
    for name in ("config.json", "stitch.safetensors", "head.safetensors", "metrics.json"):
        assert (tmp_path / "run" / name).is_file()
    assert set(metrics["stages"]) == {"ffm", "tlt"}
    assert {"layer_distance", "final_distance", "pooled_distance"} <= set(metrics)


def test_resume_after_interruption_gives_same_metrics(stores, tmp_path):
    base = dict(objective="ffm+tlt", lrs=(1e-3, 5e-3), epochs=3)
    reference = fit(_config(stores, tmp_path / "a", **base))
    config = _config(stores, tmp_path / "b", **base)
    seen = []

    def interrupt(row):
        seen.append(row)
        if len(seen) == 7:  # inside the first TLT learning rate
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, interrupt)
    assert (tmp_path / "b" / "run" / "checkpoint.json").is_file()
    resumed = fit(config)
    for key in ("test_accuracy", "layer_distance", "final_distance", "pooled_distance"):
        assert resumed[key] == reference[key], key
    assert resumed["stages"] == reference["stages"]
    assert not (tmp_path / "b" / "run" / "checkpoint.json").exists()
    again = fit(config)  # a finished run dir: same config, re-evaluated, same numbers
    assert again["test_accuracy"] == reference["test_accuracy"]


# -- refusals -------------------------------------------------------------------------------------
def test_unpaired_stores_and_missing_layers_are_refused(stores, tmp_path):
    with pytest.raises(PairingError, match="different images"):
        StitchRecipe(
            FitConfig(
                source=stores["dinov2-tiny", "train", "float16"],
                target=stores["clip-tiny", "test", "float16"],
                position=2,
                out=str(tmp_path),
            )
        )
    with pytest.raises(PairingError, match="layers/5"):
        StitchRecipe(_config(stores, tmp_path, position=5))
    with pytest.raises(PositionError, match=r"1\.\.5 .* Got 6 instead"):  # no target block left
        StitchRecipe(_config(stores, tmp_path, position=6))


def test_target_fingerprint_mismatch_is_refused(stores, tmp_path):
    clip = featcache.load_encoder("clip-tiny")
    state = {k: v.clone().contiguous() for k, v in clip.module.state_dict().items()}
    state["ln_post.weight"][0] += 1.0
    weights = tmp_path / "other.safetensors"
    save_file(state, str(weights))
    with pytest.raises(FeatcacheError) as info:
        StitchRecipe(_config(stores, tmp_path, target_weights=str(weights)))
    recorded = FeatureStore.open(stores["clip-tiny", "train", "float16"]).attrs["encoder"]
    assert recorded["fingerprint"] in str(info.value)
    overrides = recorded["spec"]["overrides"]  # the store's geometry (a split with masks)
    loaded = featcache.load_encoder("clip-tiny", weights=weights, **overrides)
    assert loaded.fingerprint in str(info.value)


def test_changed_config_on_existing_run_dir_is_refused(stores, tmp_path):
    fit(_config(stores, tmp_path, epochs=1))
    with pytest.raises(FeatcacheError, match="different config"):
        fit(_config(stores, tmp_path, epochs=2))


# -- command line ---------------------------------------------------------------------------------
def test_cli_fit_eval_probe(stores, tmp_path):
    source, target = (
        stores["siglip2-tiny", "train", "float16"],
        stores["dinov2-tiny", "train", "float16"],
    )
    fit_args = ["fit", "--source", source, "--target", target, "--position", "3"]
    result = runner.invoke(
        app,
        [
            *fit_args,
            "--out",
            str(tmp_path / "run"),
            "--stitch",
            "linear",
            "--objective",
            "lfm",
            "--lr",
            "1e-2",
            "--epochs",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{") :])
    assert metrics["evaluation"] == "linear_probe" and 0 <= metrics["test_accuracy"] <= 1
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.output[result.output.index("{") :])
    assert again["test_accuracy"] == metrics["test_accuracy"]
    assert again["layer_distance"] == pytest.approx(metrics["layer_distance"])
    result = runner.invoke(
        app, ["probe", "--store", target, "--out", str(tmp_path / "probe"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :])["test_accuracy"] > 0.5
    result = runner.invoke(
        app,
        [
            *fit_args,
            "--out",
            str(tmp_path / "bad"),
            "--stitch",
            "conv",
        ],
    )
    assert result.exit_code == 2 and "'conv' is not one of" in result.output


def test_segmentation_tlt_and_lora_stitch(stores, tmp_path):
    """TLT for segmentation (linear decoder, mIoU) through a LoRA stitch (source block n with
    LoRA, fed source layer n-1), streamed from the stores under a tiny memory budget."""
    config = _config(
        stores,
        tmp_path,
        stitch="lora",
        objective="tlt",
        task="seg",
        epochs=2,
        memory_budget="64kB",
        random_init=False,
    )
    recipe = StitchRecipe(config)
    assert not recipe._stage_loader("tlt", "train").staged  # streamed: over the budget
    assert recipe.source_encoder is not None and recipe.num_classes == 4  # background + 3
    trainable = {n for n, p in recipe.stitch.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or "map" in n or "offset" in n for n in trainable)
    metrics = recipe.run()
    assert 0.0 <= metrics["test_miou"] <= 1.0 and metrics["evaluation"] == "head"
    assert metrics["stages"]["tlt"]["val_metric"] is not None
