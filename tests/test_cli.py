"""The command-line apps, driven as a user would (typer's CliRunner)."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app

runner = CliRunner()


def test_models_lists_every_preset():
    from featcache import PRESETS

    result = runner.invoke(featcache_app, ["models"])
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert name in result.output
    assert "24x24" in result.output and "CLS + 4 reg" in result.output


def test_demo_extracts_two_families(tmp_path):
    from featcache.store import find_stores

    result = runner.invoke(featcache_app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "manifest.csv").is_file()
    stores = find_stores(str(tmp_path / "stores"))
    assert sorted((s.attrs["encoder"]["name"], s.attrs["dataset"]["split"]) for s in stores) == [
        ("dinov2-tiny", "test"),
        ("dinov2-tiny", "train"),
        ("siglip2-tiny", "test"),
        ("siglip2-tiny", "train"),
    ]
    assert all(store.is_complete for store in stores)
    assert "img/s" in result.output


def test_positions_and_unknown_model_error():
    result = runner.invoke(stitchtrain_app, ["positions", "dinov2-tiny", "siglip2-tiny"])
    assert result.exit_code == 0, result.output
    assert "1..5" in result.output and "96 -> D=128" in result.output
    result = runner.invoke(stitchtrain_app, ["positions", "dinov2-tny", "siglip2-tiny"])
    assert result.exit_code == 2
    assert "dinov2-tiny" in result.output
