"""featcache show / stitchtrain show: PCA-to-RGB pictures of stored tokens and of a stitch.

The PCA is checked against a reference written here from the documented maths (an SVD of the
centred tokens, not the module's covariance eigenvectors), on arrays read with plain zarr; the
encoders are shown not to run on images (unknown model name in the store, forwards patched to
fail).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import pair_fit_config, reseal_marker
from PIL import Image
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.encoders.base import Encoder
from featcache.show import PcaBasis, show_store
from featcache.store import FeatureStore
from tests.conftest import extract_demo_stores

runner = CliRunner()
MODELS = ("dinov2-tiny", "clip-tiny")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split): url}: 3 classes x 4 images (9 train, 3 test rows), layers 1-3."""
    root = tmp_path_factory.mktemp("show")
    return extract_demo_stores(
        root / "data", root / "stores", models=MODELS, layers=[1, 2, 3], shard_size=8, per_class=4
    )


@pytest.fixture(scope="module")
def run_dir(stores, tmp_path_factory):
    """A finished one-epoch FFM linear stitch dinov2-tiny -> clip-tiny at position 2."""
    from stitchtrain.pipeline.fit import fit

    out = tmp_path_factory.mktemp("show-run") / "run"
    overrides = dict(stitch="linear", objective="ffm", lrs=(5e-3,), epochs=1, patience=1)
    fit(pair_fit_config(stores, out, batch_size=None, **overrides))
    return out


def reference_rgb(tokens: np.ndarray, basis_tokens: np.ndarray | None = None) -> np.ndarray:
    """The module doc's maths by another route: ``(N, D)`` -> ``(N, 3)`` colours, with the PCA
    (right singular vectors of the centred tokens, largest-loading-positive signs, 1st-99th
    percentile scaling) fitted on ``basis_tokens`` (default: ``tokens``)."""
    fit_on = np.asarray(tokens if basis_tokens is None else basis_tokens, np.float64)
    mean = fit_on.mean(0)
    top = np.linalg.svd(fit_on - mean, full_matrices=False)[2][:3].T  # (D, 3)
    top *= np.sign(top[np.abs(top).argmax(0), np.arange(3)])
    fitted = (fit_on - mean) @ top
    low, high = np.percentile(fitted, [1, 99], axis=0)
    scores = (np.asarray(tokens, np.float64) - mean) @ top
    return np.clip((scores - low) / (high - low), 0, 1)


def zarr_rows(url: str, name: str, rows) -> np.ndarray:
    """Rows of a store array read with plain zarr (float16 -> float32), not FeatureStore."""
    return zarr.open_group(url, mode="r")[name][np.asarray(rows)].astype(np.float32)


def axes_boxes_px(figure) -> dict[str, list[tuple[int, int, int, int]]]:
    """{axes label: [(left, top, right, bottom) in PNG pixels, ...]} of every axes."""
    height = figure.bbox.height
    boxes: dict[str, list] = {}
    for ax in figure.axes:
        x0, y0, x1, y1 = ax.get_window_extent().extents
        box = (round(x0), round(height - y1), round(x1), round(height - y0))
        boxes.setdefault(ax.get_label(), []).append(box)
    return boxes


def check_grid(figure_result, png, rows: int, columns: int) -> None:
    """The PNG has the layout's pixel size and one axes at each panel box of a rows x columns
    grid (plus, with a colour bar, one bar right of the last column)."""
    layout = figure_result.layout
    assert (layout.rows, len(layout.columns)) == (rows, columns)
    assert Image.open(png).size == layout.size_px
    expected = {layout.panel_box_px(r, c) for r in range(rows) for c in range(columns)}
    boxes = axes_boxes_px(figure_result.figure)
    assert sorted(boxes.pop("")) == sorted(expected)
    if layout.colorbar:
        ((left, top, right, bottom),) = boxes.pop("colorbar")
        assert layout.panel_box_px(0, columns - 1)[2] < left < right <= layout.size_px[0]
    assert not boxes


# -- featcache show -----------------------------------------------------------------------------
def test_featcache_show_writes_the_documented_grid(stores, tmp_path):
    url = stores["dinov2-tiny", "train"]
    out = tmp_path / "maps.png"
    result = runner.invoke(
        featcache_app,
        ["show", url, "--layer", "1", "--layer", "3", "--images", "4", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "4 rows x 3 panels (dinov2-tiny input, layer 1, layer 3)" in result.output
    shown = show_store(url, layers=[1, 3], images=4)
    shown.save(out)
    check_grid(shown, out, rows=4, columns=3)
    assert shown.rows.tolist() == [0, 1, 2, 3]
    # default columns: every stored layer (three here)
    assert show_store(url, images=1).layout.columns[1:] == ("layer 1", "layer 2", "layer 3")


def test_image_panel_is_the_model_input(stores, encoder_cache):
    """The first panel is the preprocessed image with the normalisation undone."""
    url = stores["dinov2-tiny", "train"]
    shown = show_store(url, layers=[2], rows=[5])
    store = FeatureStore.open(url)
    manifest = store.attrs["dataset"]["source"]
    path = manifest.rsplit("/", 1)[0] + "/" + str(store.read("ids")[5])
    encoder = encoder_cache("dinov2")
    tensor = encoder.preprocess(Image.open(path).convert("RGB"))
    mean = torch.tensor(encoder.preprocessing.mean)[:, None, None]
    std = torch.tensor(encoder.preprocessing.std)[:, None, None]
    expected = (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    assert shown.notes == [None]
    np.testing.assert_allclose(shown.images[0], expected, atol=1e-6)


def test_pca_comes_from_the_stored_arrays_not_an_encoder(stores, tmp_path):
    """A copy of a store whose layer 2 holds planted tokens, whose encoder cannot be loaded
    (unknown name) and whose dataset is gone: the maps are the planted tokens' PCA (prefix
    token dropped), equal to the reference PCA; the image panels are blank and the figure
    says why once (``dataset_note``)."""
    copy = tmp_path / "planted.zarr"
    shutil.copytree(stores["dinov2-tiny", "train"], copy)
    group = zarr.open_group(str(copy), mode="r+")
    attrs = dict(group.attrs["featcache"])
    attrs["encoder"] = {**attrs["encoder"], "name": "no-such-model", "spec": {"gone": True}}
    source = attrs["dataset"]["source"]
    attrs["dataset"] = {**attrs["dataset"], "source": str(tmp_path / "moved" / "manifest.csv")}
    group.attrs["featcache"] = attrs
    array = group["layers/2"]
    images, tokens, width = array.shape  # 1 CLS + 8 x 8 patches
    rng = np.random.default_rng(0)
    columns = np.tile(np.arange(8), 8)  # patch p = (p // 8, p % 8)
    planted = rng.normal(0, 0.01, size=(images, tokens, width))
    planted[:, 1:, 0] += np.where(columns < 4, 3.0, -3.0)  # left vs right: component 1
    planted[:, 1:, 1] += np.repeat(np.arange(8) - 3.5, 8) * 0.2  # top to bottom: component 2
    planted[:, 0, :] = 500.0  # a huge CLS token would dominate a PCA that kept it
    array[:] = planted.astype(np.float16)
    reseal_marker(str(copy))  # the planted tokens as if extracted

    shown = show_store(str(copy), layers=[2], images=images)
    maps = shown.maps["layer 2"]  # (I, 8, 8, 3)
    assert maps.shape == (images, 8, 8, 3)
    assert (maps[:, :, :4, 0] > 0.9).all() and (maps[:, :, 4:, 0] < 0.1).all()
    rows_mean = maps[..., 1].mean(axis=(0, 2))
    assert np.all(np.diff(rows_mean) > 0)
    stored = zarr_rows(str(copy), "layers/2", shown.rows)[:, 1:].reshape(-1, width)
    np.testing.assert_allclose(maps.reshape(-1, 3), reference_rgb(stored), atol=2e-4)
    assert shown.images == [None] * images
    assert shown.notes == [None] * images
    assert shown.dataset_note.startswith(f"dataset no longer at {tmp_path / 'moved'}")
    out = tmp_path / "blank.png"
    shown.save(out)
    check_grid(shown, out, rows=images, columns=2)
    # the dataset back in place, but not the one the store records: no image either
    attrs["dataset"] = {**attrs["dataset"], "source": source, "manifest_hash": "0" * 32}
    group.attrs["featcache"] = attrs
    changed = show_store(str(copy), layers=[2], rows=[0])
    assert changed.notes == [None] and f"manifest hash {'0' * 32} recorded" in changed.dataset_note


def test_maps_equal_the_reference_pca_on_real_tokens(stores):
    url = stores["clip-tiny", "train"]
    shown = show_store(url, layers=[1, "final"], images=6)
    for title, name in (("layer 1", "layers/1"), ("final", "final")):
        stored = zarr_rows(url, name, shown.rows)[:, 1:]  # clip-tiny: one CLS token
        expected = reference_rgb(stored.reshape(-1, stored.shape[-1]))
        np.testing.assert_allclose(shown.maps[title].reshape(-1, 3), expected, atol=2e-4)


def test_featcache_show_one_line_errors(stores, tmp_path):
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    url = stores["dinov2-tiny", "train"]
    out = str(tmp_path / "x.png")
    cases = [
        (["--layer", "5"], "1, 2, 3 or final. Got '5'"),
        (["--images", "50"], "between 1 and 9"),
        (["--rows", "0,42"], "Got [42]"),
    ]
    for extra, expected in cases:
        result = runner.invoke(featcache_app, ["show", url, *extra, "--out", out])
        assert result.exit_code == 2, result.output
        assert expected in result.output and result.output.strip().count("\n") <= 1
    bad_out = runner.invoke(featcache_app, ["show", url, "--out", str(tmp_path / "x.txt2")])
    assert bad_out.exit_code == 2 and ".png" in bad_out.output
    manifest = FeatureStore.open(url).attrs["dataset"]["source"]
    config = ExtractConfig(
        models=["dinov2-tiny"],
        data=manifest,
        out=str(tmp_path / "pooled"),
        layers=[],
        tokens="pooled",
        split="test",
    )
    plan = plan_extraction(config)
    run_extraction(plan)
    result = runner.invoke(featcache_app, ["show", plan.urls[0], "--out", out])
    assert result.exit_code == 2
    assert "pooled features only" in result.output and "--tokens all" in result.output
    assert not (tmp_path / "x.png").exists()


# -- stitchtrain show ---------------------------------------------------------------------------
@pytest.fixture()
def no_image_forwards(monkeypatch):
    """Every encoder forward that starts from images fails; ``run_from`` (the tail) is left."""

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran on images")

    for name in ("run", "run_layers", "forward"):
        monkeypatch.setattr(Encoder, name, refuse)


def test_stitchtrain_show_maps_from_the_stores(run_dir, stores, tmp_path, no_image_forwards):
    from stitchtrain.evaluate.evaluation import load_run
    from stitchtrain.studies.show import show_run

    shown = show_run(run_dir, images=3)
    out = tmp_path / "stitch.png"
    shown.save(out)
    check_grid(shown, out, rows=3, columns=5)
    assert shown.layout.colorbar
    assert shown.extra["split"] == "test"
    source_url, target_url = stores["dinov2-tiny", "test"], stores["clip-tiny", "test"]
    assert (shown.extra["source_store"], shown.extra["target_store"]) == (source_url, target_url)

    rows = shown.rows
    source = zarr_rows(source_url, "layers/2", rows)  # (3, 65, 96)
    target = zarr_rows(target_url, "final", rows)[:, 1:]  # (3, 64, 64)
    recipe = load_run(run_dir)
    with torch.no_grad():
        stitched = recipe.stitched_outputs(torch.from_numpy(source))[0].numpy()[:, 1:]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    maps = list(shown.maps.values())
    np.testing.assert_allclose(flat(maps[0]), reference_rgb(flat(source[:, 1:])), atol=2e-4)
    np.testing.assert_allclose(flat(maps[2]), reference_rgb(flat(target)), atol=2e-4)
    # the stitched map uses the target's basis: the reference fitted on the target finals
    expected = reference_rgb(flat(stitched), basis_tokens=flat(target))
    np.testing.assert_allclose(flat(maps[1]), expected, atol=2e-4)
    assert isinstance(shown.extra["basis"], PcaBasis)
    cosine = (stitched * target).sum(-1) / (
        np.linalg.norm(stitched, axis=-1) * np.linalg.norm(target, axis=-1)
    )
    np.testing.assert_allclose(shown.extra["cosine"].reshape(3, -1), cosine, atol=1e-4)
    assert shown.notes == [None] * 3 and shown.images[0].shape == (112, 112, 3)


def test_stitchtrain_show_cli_and_train_fallback(run_dir, stores, tmp_path, no_image_forwards):
    from stitchtrain.studies.show import show_run

    out = tmp_path / "cli.png"
    result = runner.invoke(
        stitchtrain_app, ["show", str(run_dir), "--images", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and "2 rows x 5 panels" in result.output and "test split" in result.output
    # the same run with its train stores alone (no test split beside them): train rows
    alone = tmp_path / "alone"
    config = json.loads((run_dir / "config.json").read_text())
    for role, model in (("source", "dinov2-tiny"), ("target", "clip-tiny")):
        copy = alone / "train" / f"{model}.zarr"
        shutil.copytree(stores[model, "train"], copy)
        config[role] = str(copy)
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    (moved / "config.json").write_text(json.dumps(config))
    shown = show_run(moved, images=9)
    assert shown.extra["split"] == "train" and len(shown.rows) == 9
    result = runner.invoke(
        stitchtrain_app, ["show", str(moved), "--images", "10", "--out", str(out)]
    )
    assert result.exit_code == 2 and "between 1 and 9" in result.output
    result = runner.invoke(stitchtrain_app, ["show", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 2 and "not a stitchtrain run dir" in result.output
