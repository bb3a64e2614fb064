"""What a newcomer hits in the first hour (issue 23): the default ``--layers`` of a model that
is not 24 blocks deep, timm-style layer indices, ``stitchtrain positions`` on stores, one epoch
convention in the console and the run dir's files.

Real tiny models (6 blocks), a real demo dataset of a few images and real stores throughout.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app

runner = CliRunner()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from featcache.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("images"), num_classes=2, per_class=2)


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())  # rich boxes wrap long lines


# -- point 2: the default --layers, negative indices, all ----------------------------------------
def test_default_layers_follow_the_depth():
    from featcache.extract.layers import default_layers

    assert default_layers(24) == (2, 6, 10, 14, 18, 22, 24)  # the paper's, unchanged
    assert default_layers(12) == (1, 3, 5, 7, 9, 11, 12)
    assert default_layers(6) == (1, 2, 3, 4, 5, 6)
    assert default_layers(2) == (1, 2)


def test_extract_without_layers_fits_a_six_block_model(tmp_path, manifest):
    from featcache.store import FeatureStore

    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest)]
    args += ["--out", str(tmp_path / "out"), "--split", "train", "--json"]
    result = runner.invoke(featcache_app, args)
    assert result.exit_code == 0, result.output
    (store,) = (tmp_path / "out" / "train").glob("*.zarr")
    assert list(FeatureStore.open(str(store)).layers) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "typed, layers",
    [("-1", (6,)), ("2,-1,-2", (2, 5, 6)), ("-6,0", (0, 1)), ("all", (0, 1, 2, 3, 4, 5, 6))],
)
def test_negative_indices_and_all_resolve_per_model(tmp_path, manifest, typed, layers):
    from featcache.extract import ExtractConfig, plan_extraction

    config = ExtractConfig(
        models=["dinov2-tiny"], data=str(manifest), out=str(tmp_path), layers=typed
    )
    assert plan_extraction(config).specs[0].layers == layers


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("2,7", "Expected --layers in 0..6 or -6..-1 (-1: the last block), or all, for "
         "dinov2-tiny (depth 6). Got 7 in --layers '2,7' instead."),
        ("-7", "Got -7 in --layers '-7' instead."),
    ],
)  # fmt: skip
def test_layers_out_of_range_name_what_was_typed(tmp_path, manifest, typed, expected):
    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest)]
    args += ["--out", str(tmp_path / "out"), f"--layers={typed}"]
    result = runner.invoke(featcache_app, args)
    assert result.exit_code == 2, result.output
    assert expected in _flat(result.output)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("typed", ["2,x", "all,2", ",,", "1.5"])
def test_layers_not_understood_say_what_is_accepted(tmp_path, manifest, typed):
    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest)]
    args += ["--out", str(tmp_path / "out"), f"--layers={typed}"]
    result = runner.invoke(featcache_app, args)
    assert result.exit_code == 2, result.output
    flat = _flat(result.output)
    assert f"Got {typed!r} instead" in flat and "all" in flat and "-1" in flat, flat


# -- point 8: stitchtrain positions takes stores --------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory, manifest):
    """dinov2-tiny and clip-tiny (6 blocks each) train stores holding layers 2, 4 and 6 only."""
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    out = tmp_path_factory.mktemp("stores")
    config = ExtractConfig(
        models=["dinov2-tiny", "clip-tiny"], data=str(manifest), out=str(out), layers=[2, 4, 6]
    )
    plan = plan_extraction(config)
    run_extraction(plan)
    return dict(zip(config.models, plan.urls, strict=True))


@pytest.mark.parametrize(
    "options, allowed",
    [
        ([], "2, 4"),  # fit's defaults: ffm+tlt, mlp stitch
        (["--objective", "lfm"], "2, 4"),
        (["--stitch", "lora"], "3, 5"),  # LoRA at n reads source layer n-1
    ],
)
def test_positions_of_stores_are_those_their_layers_allow(stores, options, allowed):
    from cli.stitchtrain_app import app

    args = ["positions", stores["dinov2-tiny"], stores["clip-tiny"], *options]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    flat = _flat(result.output)
    assert "stitch positions: 1..5" in flat, flat
    assert f"these stores allow: {allowed}" in flat, flat


def test_fit_accepts_exactly_the_positions_that_positions_lists(stores):
    from featcache.store import FeatureStore
    from stitchtrain.data.pairing import PairingError, check_pair, usable_positions

    source, target = (FeatureStore.open(stores[m]) for m in ("dinov2-tiny", "clip-tiny"))
    usable = usable_positions(source, target, stitch="mlp", objective="ffm+tlt")
    assert usable == [2, 4]
    for position in range(1, 6):
        if position in usable:
            check_pair(
                source, target, position=position, stitch="mlp", objective="ffm+tlt", task="cls"
            )
        else:
            with pytest.raises(PairingError, match="these stores allow: 2, 4"):
                check_pair(
                    source, target, position=position, stitch="mlp", objective="ffm+tlt", task="cls"
                )


def test_positions_of_encoder_names_still_work():
    from cli.stitchtrain_app import app

    result = runner.invoke(app, ["positions", "dinov2-tiny", "clip-tiny"])
    assert result.exit_code == 0, result.output
    assert "stitch positions: 1..5" in result.output


def test_positions_refuses_a_store_with_an_encoder_name(stores):
    from cli.stitchtrain_app import app

    result = runner.invoke(app, ["positions", stores["dinov2-tiny"], "clip-tiny"])
    assert result.exit_code == 2, result.output
    flat = _flat(result.output)
    assert "Expected two stores or two encoder names" in flat and "'clip-tiny'" in flat, flat
    assert "Traceback" not in result.output
