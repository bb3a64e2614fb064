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
