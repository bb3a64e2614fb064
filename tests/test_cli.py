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


def test_demo_runs_each_tiny_encoder(tmp_path):
    result = runner.invoke(featcache_app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "manifest.csv").is_file()
    for name in ("dinov2-tiny", "dinov3-tiny", "siglip2-tiny", "clip-tiny"):
        assert name in result.output
    assert "(8, 69, 128)" in result.output  # dinov3-tiny: CLS + 4 registers + 8x8 patches


def test_positions_and_unknown_model_error():
    result = runner.invoke(stitchtrain_app, ["positions", "dinov2-tiny", "siglip2-tiny"])
    assert result.exit_code == 0, result.output
    assert "1..5" in result.output and "96 -> D=128" in result.output
    result = runner.invoke(stitchtrain_app, ["positions", "dinov2-tny", "siglip2-tiny"])
    assert result.exit_code == 2
    assert "dinov2-tiny" in result.output
