"""Paired tokens see the same pixels: each store records its geometry, pairing compares them.

Token (i, j) of a source store and token (i, j) of a target store (after the stitch resamples
the source grid to the target grid, by grid fraction) must cover the same region of the
original image. The presets share one geometry by default; a pair extracted with different
crops is refused unless ``--allow-geometry-mismatch`` is given.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from typer.testing import CliRunner

import featcache
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.demo_data import make_demo_dataset
from featcache.encoders import PRESETS, describe_preset
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.preprocess import REFERENCE_SIZES, Geometry, token_offset
from featcache.store import FeatureStore
from stitchtrain.data.pairing import PairingError, check_geometry, check_pair, store_geometry

runner = CliRunner()
TINY = [name for name, preset in PRESETS.items() if preset.tiny]
PAPER = [name for name, preset in PRESETS.items() if not preset.tiny]


@pytest.fixture(scope="module")
def described():
    """describe_preset of every preset (meta device: no weights, no memory)."""
    return {name: describe_preset(name) for name in PRESETS}


# -- the geometry itself -------------------------------------------------------------------------
def test_token_boxes_in_original_pixels():
    geometry = Geometry((336, 336), "shortest", 1.0, (24, 24), (14, 14))
    # 640x480: shorter side 480 -> 336, longer 448; centre crop keeps x in [80, 560)
    assert geometry.input_box(640, 480) == pytest.approx((80.0, 0.0, 560.0, 480.0))
    assert geometry.token_box(640, 480, 0, 0) == pytest.approx((80.0, 0.0, 100.0, 20.0))
    assert geometry.token_box(640, 480, 23, 23) == pytest.approx((540.0, 460.0, 560.0, 480.0))
    squash = Geometry((384, 384), "squash", 1.0, (24, 24), (16, 16))
    assert squash.input_box(640, 360) == pytest.approx((0.0, 0.0, 640.0, 360.0))
    cropped = Geometry((384, 384), "shortest", 0.9, (24, 24), (16, 16))
    left, top, right, bottom = cropped.input_box(640, 640)  # 640 -> 426, crop 384 from 21
    assert left == pytest.approx(21 * 640 / 426) and right == pytest.approx(405 * 640 / 426)
    assert (top, bottom) == pytest.approx((left, right))


def test_geometry_round_trips_through_json():
    geometry = Geometry((384, 384), "shortest", 0.9, (24, 24), (16, 16))
    assert Geometry.from_dict(geometry.to_dict()) == geometry
    import json

    assert Geometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry
    assert "crop_pct 0.9" in str(geometry) and "24x24" in str(geometry)


def test_identical_boxes_agree_whatever_the_grids():
    a = Geometry((224, 224), "shortest", 1.0, (14, 14), (16, 16))
    b = Geometry((336, 336), "shortest", 1.0, (24, 24), (14, 14))
    assert token_offset(a, b, sizes=[(640, 640)]) < 1e-9
    assert token_offset(a, b) < 0.05 and token_offset(b, a) < 0.05  # integer rounding only


# -- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["paper", "tiny"])
def test_default_geometry_agrees_for_every_preset_pair(described, group):
    names = PAPER if group == "paper" else TINY
    for source, target in itertools.permutations(names, 2):
        a = Geometry.from_dict(described[source]["geometry"])
        b = Geometry.from_dict(described[target]["geometry"])
        for size in REFERENCE_SIZES:
            offset = token_offset(a, b, sizes=[size])
            assert offset <= 0.1, (source, target, size, offset)


def test_default_geometry_keeps_input_size_and_normalisation(described):
    for name in PRESETS:
        own, used = described[name]["pretrained_preprocessing"], described[name]["preprocessing"]
        assert used["image_size"] == own["image_size"], name
        assert (used["mean"], used["std"]) == (own["mean"], own["std"]), name
        assert (used["resize_mode"], used["crop_pct"]) == ("shortest", 1.0), name


def test_pretrained_crops_reproduce_the_offset(described):
    """The old behaviour: each model's own crop. SigLIP2 (crop 0.9) vs DINOv2 is > 1 patch off."""
    siglip = Geometry.from_dict(described["siglip2-l"]["pretrained_geometry"])
    dinov2 = Geometry.from_dict(described["dinov2-l"]["pretrained_geometry"])
    assert siglip.crop_pct == pytest.approx(0.9) and dinov2.crop_pct == 1.0
    offset = token_offset(siglip, dinov2, sizes=[(640, 640)])
    assert 1.0 < offset < 1.7
    # per column at the middle row, in DINOv2 patches: 14 of 24 off by more than half a patch
    xs_s = siglip.token_centres(640, 640)[1]
    xs_d = dinov2.token_centres(640, 640)[1]
    patch = 640 / 24
    off = np.abs(xs_s - xs_d) / patch
    assert 1.1 < off.max() < 1.2
    assert int((off > 0.5).sum()) == 14
    tiny_s = Geometry.from_dict(described["siglip2-tiny"]["pretrained_geometry"])
    tiny_d = Geometry.from_dict(described["dinov2-tiny"]["pretrained_geometry"])
    assert token_offset(tiny_s, tiny_d) > 0.1


def test_preset_geometry_is_an_override_in_the_spec(encoder_cache):
    siglip = encoder_cache("siglip2")
    assert siglip.spec["overrides"]["crop_pct"] == 1.0
    assert siglip.preprocessing.crop_pct == 1.0
    assert siglip.describe()["geometry"] == siglip.geometry.to_dict()
    own = featcache.load_encoder("siglip2-tiny", crop_pct=0.9)
    assert own.preprocessing.crop_pct == pytest.approx(0.9)
    assert own.fingerprint != siglip.fingerprint
    # reloading from the recorded spec reproduces the encoder
    again = featcache.load_encoder("siglip2-tiny", **own.spec["overrides"])
    assert again.fingerprint == own.fingerprint
    with pytest.raises(ValueError, match="crop_pct"):
        featcache.load_encoder("siglip2-tiny", crop_pct=1.5)


# -- stores ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, crop, split): url}: dinov2-tiny and clip-tiny at the default geometry, and
    clip-tiny extracted with --crop-pct 0.8."""
    root = tmp_path_factory.mktemp("geometry")
    manifest = make_demo_dataset(root / "data", num_classes=2, per_class=6)
    urls = {}
    runs = [(["dinov2-tiny", "clip-tiny"], None), (["clip-tiny"], 0.8)]
    for split in ("train", "test"):
        for models, crop in runs:
            config = ExtractConfig(
                models=models,
                data=str(manifest),
                out=str(root / f"stores-{crop}"),
                layers=[1, 2],
                split=split,
                shard_size=8,
                crop_pct=crop,
            )
            plan = plan_extraction(config)
            run_extraction(plan)
            urls.update({(m, crop, split): u for m, u in zip(models, plan.urls, strict=True)})
    return urls


def test_store_records_geometry(stores):
    store = FeatureStore.open(stores["clip-tiny", 0.8, "train"])
    recorded = store.attrs["encoder"]["geometry"]
    geometry = Geometry.from_dict(recorded)
    assert geometry.crop_pct == pytest.approx(0.8) and geometry.grid == (8, 8)
    assert geometry.patch_size == (14, 14) and geometry.image_size == (112, 112)
    assert store.attrs["encoder"]["spec"]["overrides"]["crop_pct"] == pytest.approx(0.8)
    assert store_geometry(store) == geometry
    # a store written before geometry was recorded: derived from its preprocessing
    legacy = {k: v for k, v in store.attrs["encoder"].items() if k != "geometry"}
    assert Geometry.from_description(legacy) == geometry


def test_extract_config_checks_geometry_options():
    with pytest.raises(FeatcacheError, match="--crop-pct"):
        ExtractConfig(models=["dinov2-tiny"], data="x", out="y", layers=[1], crop_pct=0.0)
    with pytest.raises(FeatcacheError, match="--resize-mode"):
        ExtractConfig(models=["dinov2-tiny"], data="x", out="y", layers=[1], resize_mode="fit")


def test_default_pair_is_accepted(stores):
    source = FeatureStore.open(stores["dinov2-tiny", None, "train"])
    target = FeatureStore.open(stores["clip-tiny", None, "train"])
    assert check_geometry(source, target) <= 0.1
    check_pair(source, target, position=2, stitch="linear", objective="lfm", task="cls")


def test_different_crops_are_refused_and_the_override_accepts(stores):
    source = FeatureStore.open(stores["dinov2-tiny", None, "train"])
    target = FeatureStore.open(stores["clip-tiny", 0.8, "train"])
    with pytest.raises(PairingError) as caught:
        check_pair(source, target, position=2, stitch="linear", objective="lfm", task="cls")
    message = str(caught.value)
    assert "crop_pct 1" in message and "crop_pct 0.8" in message
    assert "dinov2-tiny" in message and "clip-tiny" in message
    assert "--allow-geometry-mismatch" in message and "\n" not in message
    with pytest.raises(PairingError):
        check_geometry(target, source)
    offset = check_geometry(source, target, allow_mismatch=True)
    assert offset > 0.1
    check_pair(
        source,
        target,
        position=2,
        stitch="linear",
        objective="lfm",
        task="cls",
        allow_geometry_mismatch=True,
    )


def test_cli_fit_refuses_mismatch_and_accepts_override(stores, tmp_path):
    args = [
        "fit",
        "--source",
        stores["dinov2-tiny", None, "train"],
        "--target",
        stores["clip-tiny", 0.8, "train"],
        "--position",
        "2",
        "--stitch",
        "linear",
        "--objective",
        "lfm",
        "--lr",
        "1e-2",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--json",
    ]
    refused = runner.invoke(stitchtrain_app, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1, refused.output
    assert "crop_pct 0.8" in lines[0] and "crop_pct 1" in lines[0]
    assert "--allow-geometry-mismatch" in lines[0]
    accepted = runner.invoke(
        stitchtrain_app, [*args, "--out", str(tmp_path / "b"), "--allow-geometry-mismatch"]
    )
    assert accepted.exit_code == 0, accepted.output


def test_cka_refuses_mismatch_unless_allowed(stores):
    from stitchtrain.studies.cka import cka_stores

    a, b = stores["dinov2-tiny", None, "train"], stores["clip-tiny", 0.8, "train"]
    with pytest.raises(PairingError, match="--allow-geometry-mismatch"):
        cka_stores(a, b, [1], [1])
    result = cka_stores(a, b, [1], [1], allow_geometry_mismatch=True)
    assert 0.0 <= result.values[0][0] <= 1.0 + 1e-6
    cka_stores(a, stores["clip-tiny", None, "train"], [1], [1])


def test_sweep_plan_refuses_mismatch_unless_allowed(stores):
    from stitchtrain.studies.sweep.grid import plan_sweep

    config = {
        "stores": {
            "dinov2": stores["dinov2-tiny", None, "train"],
            "clip": stores["clip-tiny", 0.8, "train"],
        },
        "grid": {"positions": [2], "objectives": ["lfm"], "stitches": ["linear"]},
    }
    with pytest.raises(PairingError, match="--allow-geometry-mismatch"):
        plan_sweep(config)
    plan = plan_sweep({**config, "fit": {"allow_geometry_mismatch": True}})
    assert all(p.config.get("allow_geometry_mismatch") for p in plan.points if p.kind != "probe")
    config["stores"]["clip"] = stores["clip-tiny", None, "train"]
    assert plan_sweep(config).points


def test_cli_extract_crop_pct_reaches_the_store(tmp_path):
    from cli.featcache_app import app as featcache_app

    manifest = make_demo_dataset(tmp_path / "data", num_classes=2, per_class=2)
    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest), "--layers", "1"]
    result = runner.invoke(
        featcache_app,
        [*args, "--out", str(tmp_path / "s"), "--crop-pct", "0.875", "--resize-mode", "squash"],
    )
    assert result.exit_code == 0, result.output
    (url,) = [str(p) for p in (tmp_path / "s").glob("*/*.zarr")]
    geometry = store_geometry(FeatureStore.open(url))
    assert (geometry.resize_mode, geometry.crop_pct) == ("squash", 0.875)
    bad = runner.invoke(featcache_app, [*args, "--out", str(tmp_path / "t"), "--crop-pct", "2"])
    assert bad.exit_code == 2 and "--crop-pct" in bad.output
