"""``stitchtrain export``: a hybrid as a self-contained folder that ``stitched:DIR`` loads,
refusing tampered files, missing or other parents and stitches that do not fit; ONNX."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_hybrid import _extract_cli, _images, _one_line_error, pair  # noqa: F401
from typer.testing import CliRunner

import featcache
from cli.stitchtrain_app import app as stitchtrain_app
from stitchtrain.hybrid.exported import config_digest

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(pair, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "hybrid"
    result = runner.invoke(stitchtrain_app, ["export", str(pair["run"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_export_is_small_self_contained_and_loads_as_the_run(pair, exported):  # noqa: F811
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "stitch.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "stitchtrain-hybrid" and config["format_version"] == 1
    assert config["label"] == "dinov2-tiny[:2]→siglip2-tiny" and config["stage"] == "tlt"
    assert config["source"]["name"] == "dinov2-tiny" and config["target"]["name"] == "siglip2-tiny"
    assert config["stitch"]["kind"] == "mlp" and config["position"] == 2
    assert config["layers"] == {"source": [0, 2], "target": [3, 6]}
    assert (exported / "stitch.safetensors").read_bytes() == (
        pair["run"] / "stitch-tlt.safetensors"
    ).read_bytes()
    from_run = featcache.load_encoder(f"stitched:{pair['run']}")
    from_export = featcache.load_encoder(f"stitched:{exported}")
    assert from_export.fingerprint == from_run.fingerprint == config["fingerprint"]
    assert from_export.source.fingerprint == config["source"]["fingerprint"]
    x = _images(pair, from_run)
    with torch.no_grad():
        for got, want in zip(from_export(x), from_run(x), strict=True):
            assert torch.equal(got, want)


def _edited(exported, tmp_path, edit, *, redigest=True):
    folder = tmp_path / "edited"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(exported, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    if redigest:  # a folder written consistently, elsewhere or by hand
        config["config_sha256"] = config_digest(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bad_export_folders_are_one_line_errors_and_write_nothing(
    pair,  # noqa: F811
    exported,
    tmp_path,
):
    tampered = tmp_path / "tampered"
    shutil.copytree(exported, tampered)
    data = bytearray((tampered / "stitch.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "stitch.safetensors").write_bytes(bytes(data))
    cases = [
        (tampered, ["stitch.safetensors", "SHA-256 recorded at export", "changed"]),
    ]

    def position(config):
        config["position"] = 3

    cases.append(
        (_edited(exported, tmp_path / "a", position, redigest=False), ["config.json", "edited"])
    )

    def missing_parent(config):
        config["source"]["name"] = "timm:vit_no_such_model"

    cases.append((_edited(exported, tmp_path / "b", missing_parent), ["source parent", "timm"]))

    def other_parent(config):
        config["target"]["fingerprint"] = "0" * 32

    cases.append(
        (_edited(exported, tmp_path / "c", other_parent), ["target parent", "0" * 32, "recorded"])
    )

    def other_kind(config):
        config["stitch"]["kind"] = "linear"

    cases.append((_edited(exported, tmp_path / "d", other_kind), ["linear stitch", "Got"]))
    for folder, needles in cases:
        out = tmp_path / "out"
        _one_line_error(_extract_cli(pair, f"stitched:{folder}", out, "--layers", "3"), *needles)
        assert not out.exists(), folder
    result = runner.invoke(stitchtrain_app, ["export", str(pair["self"]), "--out", str(out)])
    _one_line_error(result, "self-stitch")
    result = runner.invoke(stitchtrain_app, ["export", str(pair["run"]), "--out", str(exported)])
    _one_line_error(result, "new or empty directory")
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_with_weights_ships_both_parents_and_loading_uses_them(pair, tmp_path):  # noqa: F811
    out = tmp_path / "heavy"
    result = runner.invoke(
        stitchtrain_app, ["export", str(pair["run"]), "--out", str(out), "--with-weights"]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["shipped"] == "source.safetensors"
    shipped = {"stitch.safetensors", "source.safetensors", "target.safetensors"}
    assert set(config["files"]) == shipped
    hybrid = featcache.load_encoder(f"stitched:{out}")
    assert hybrid.fingerprint == config["fingerprint"]
    (out / "target.safetensors").unlink()
    with pytest.raises(featcache.errors.FeatcacheError, match="lacks target.safetensors"):
        featcache.load_encoder(f"stitched:{out}")


def test_onnx_export_matches_torch_in_onnxruntime(pair, tmp_path):  # noqa: F811
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    result = runner.invoke(
        stitchtrain_app, ["export", str(pair["run"]), "--out", str(out), "--format", "onnx"]
    )
    assert result.exit_code == 0, result.output
    assert "max abs difference" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["onnx"]["max_abs_diff"] < 1e-4 and "model.onnx" in config["files"]
    hybrid = featcache.load_encoder(f"stitched:{out}")
    x = _images(pair, hybrid, 3)  # real images, another batch size than the export traced
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    final, pooled = session.run(["final", "pooled"], {"image": x.numpy()})
    with torch.no_grad():
        want_final, want_pooled = hybrid(x)
    assert np.abs(final - want_final.numpy()).max() < 1e-4
    assert np.abs(pooled - want_pooled.numpy()).max() < 1e-4
