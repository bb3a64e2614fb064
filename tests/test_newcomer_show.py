"""Issue 23, point 7: the pictures name their rows and survive a moved dataset.

A class folder whose two classes each hold a ``04.jpg`` (train and test splits), extracted
with two tiny encoders, and a one-epoch stitch fitted on it. Row labels carry the image id
(its path relative to the dataset root) and the class name; when the dataset folder has moved,
``featcache show`` / ``stitchtrain show`` say so once and still draw the feature maps, and
``--data NEW_PATH`` reads the moved folder, refusing a folder whose manifest hash differs.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import pair_fit_config
from PIL import Image
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.datasets import load_dataset
from featcache.show import row_label, show_store
from featcache.store import FeatureStore

runner = CliRunner()
MODELS = ("dinov2-tiny", "clip-tiny")
TRAIN_NAMES, TEST_NAMES = ("01", "02", "03", "04"), ("03", "04")


def write_images(root: Path, split: str, names, rng: np.random.Generator) -> None:
    for cls in ("cat", "dog"):
        for name in names:
            path = root / split / cls / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split): url} over ``data``: train/{cat,dog}/01..04.jpg, test/{cat,dog}/03,04."""
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    root = tmp_path_factory.mktemp("newcomer-show")
    rng = np.random.default_rng(0)
    write_images(root / "data", "train", TRAIN_NAMES, rng)
    write_images(root / "data", "test", TEST_NAMES, rng)
    urls = {}
    for split in ("train", "test"):
        config = ExtractConfig(
            models=list(MODELS),
            data=str(root / "data"),
            out=str(root / "stores"),
            layers=[1, 2],
            split=split,
            shard_size=8,
        )
        plan = plan_extraction(config)
        run_extraction(plan)
        urls.update({(m, split): u for m, u in zip(MODELS, plan.urls, strict=True)})
    return urls


@pytest.fixture(scope="module")
def run_dir(stores, tmp_path_factory):
    """A finished one-epoch FFM linear stitch dinov2-tiny -> clip-tiny at position 2."""
    from stitchtrain.pipeline.fit import fit

    out = tmp_path_factory.mktemp("newcomer-show-run") / "run"
    overrides = dict(stitch="linear", objective="ffm", lrs=(5e-3,), epochs=1, patience=1)
    fit(pair_fit_config(stores, out, batch_size=None, **overrides))
    return out


def data_dir(stores) -> Path:
    return Path(FeatureStore.open(stores["dinov2-tiny", "train"]).attrs["dataset"]["source"])


@contextmanager
def moved_dataset(stores):
    """The dataset folder moved to a sibling ``moved`` for the duration; yields (old, new)."""
    old = data_dir(stores)
    new = old.parent / "moved"
    shutil.move(old, new)
    try:
        yield old, new
    finally:
        shutil.move(new, old)


def other_dataset(stores, tmp_path) -> Path:
    """A copy of the dataset less one image: same layout and classes, another manifest hash."""
    other = tmp_path / "other"
    shutil.copytree(data_dir(stores), other)
    (other / "train" / "dog" / "01.jpg").unlink()
    (other / "test" / "dog" / "03.jpg").unlink()
    return other


def input_axes(figure) -> list:
    """The first (input image) panel of each row, top to bottom (``panel_grid`` adds the
    panels row by row)."""
    columns = len(figure.layout.columns)
    return [figure.figure.axes[row * columns] for row in range(figure.layout.rows)]


def row_labels(figure) -> list[str]:
    """The text drawn left of each row's first panel (the row labels), top to bottom."""
    return [
        " ".join(t.get_text() for t in ax.texts if t.get_position()[0] < 0)
        for ax in input_axes(figure)
    ]


def input_panel_texts(figure) -> list[str]:
    """Every text drawn inside the first (input image) column's panels."""
    return [
        t.get_text() for ax in input_axes(figure) for t in ax.texts if 0 <= t.get_position()[0] <= 1
    ]


# -- row labels -------------------------------------------------------------------------------
def test_rows_are_labelled_with_id_and_class(stores, tmp_path):
    url = stores["dinov2-tiny", "train"]
    store = FeatureStore.open(url)
    ids = [str(i) for i in store.read("ids")]
    shown = show_store(url, layers=[1], images=8)
    shown.save(tmp_path / "maps.png")
    labels = row_labels(shown)
    assert len(set(labels)) == 8
    for row, label in zip(shown.rows.tolist(), labels, strict=True):
        image_id = ids[row]
        assert image_id in label and f"class {image_id.split('/')[1]}" in label
    fours = [label for label in labels if "/04.jpg" in label]
    assert len(fours) == 2
    assert any("train/cat/04.jpg" in x and "class cat" in x for x in fours)
    assert any("train/dog/04.jpg" in x and "class dog" in x for x in fours)
    # an id too long for the panel keeps its end (the file name) and says it was cut
    long_id = "train/" + "a-very-long-folder-name/" * 4 + "04.jpg"
    first, second = row_label(7, long_id, "cat").split("\n")
    assert first == "row 7, class cat"
    assert second.startswith("...") and second.endswith("a-very-long-folder-name/04.jpg")
    assert len(second) <= 44


# -- featcache show: moved dataset ------------------------------------------------------------
def test_featcache_show_moved_dataset_says_so_once(stores, tmp_path):
    url = stores["dinov2-tiny", "train"]
    before = show_store(url, layers=[1, 2], images=4)
    out = tmp_path / "maps.png"
    with moved_dataset(stores) as (old, _new):
        result = runner.invoke(
            featcache_app, ["show", url, "--layer", "1", "--images", "4", "--out", str(out)]
        )
        shown = show_store(url, layers=[1, 2], images=4)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert result.output.count(f"dataset no longer at {old}") == 1
    assert "image not shown" not in result.output and "Expected" not in result.output
    assert shown.dataset_note.startswith(f"dataset no longer at {old}")
    assert shown.images == [None] * 4 and shown.notes == [None] * 4
    assert input_panel_texts(shown) == []  # blank input panels, no per-panel error text
    title = "".join(shown.figure._suptitle.get_text().split())  # wrapped to the width
    assert "".join(f"input images not shown: {shown.dataset_note}".split()) in title
    for title, maps in before.maps.items():  # the feature maps are still drawn, unchanged
        np.testing.assert_array_equal(shown.maps[title], maps)


def test_featcache_show_data_reads_the_moved_dataset(stores, tmp_path):
    url = stores["dinov2-tiny", "train"]
    before = show_store(url, layers=[1], images=3)
    assert before.dataset_note is None and all(i is not None for i in before.images)
    out = tmp_path / "maps.png"
    with moved_dataset(stores) as (_old, new):
        result = runner.invoke(
            featcache_app, ["show", url, "--images", "3", "--data", str(new), "--out", str(out)]
        )
        shown = show_store(url, layers=[1], images=3, data=str(new))
    assert result.exit_code == 0, result.output
    assert "no longer" not in result.output and "image not shown" not in result.output
    assert shown.dataset_note is None and shown.notes == [None] * 3
    for got, expected in zip(shown.images, before.images, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_featcache_show_refuses_data_of_another_dataset(stores, tmp_path):
    url = stores["dinov2-tiny", "train"]
    other = other_dataset(stores, tmp_path)
    recorded = FeatureStore.open(url).attrs["dataset"]["manifest_hash"]
    other_hash = load_dataset(other).manifest_hash("train")
    assert other_hash != recorded
    out = tmp_path / "maps.png"
    result = runner.invoke(featcache_app, ["show", url, "--data", str(other), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0
    assert recorded in result.output and other_hash in result.output and str(other) in result.output
    assert not out.exists()
    missing = tmp_path / "nowhere"
    result = runner.invoke(featcache_app, ["show", url, "--data", str(missing), "--out", str(out)])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert str(missing) in result.output and "Traceback" not in result.output


# -- stitchtrain show -------------------------------------------------------------------------
def test_stitchtrain_show_labels_and_moved_dataset(stores, run_dir, tmp_path):
    from stitchtrain.studies.show import show_run

    shown = show_run(run_dir, images=4)
    labels = row_labels(shown)
    target = FeatureStore.open(stores["clip-tiny", "test"])
    ids = [str(i) for i in target.read("ids")]
    assert len(set(labels)) == 4
    for row, label in zip(shown.rows.tolist(), labels, strict=True):
        assert ids[row] in label and f"class {ids[row].split('/')[1]}" in label
        assert ", cos " in label
    assert {x for x in ids if x.endswith("04.jpg")} == {"test/cat/04.jpg", "test/dog/04.jpg"}

    out = tmp_path / "stitch.png"
    other = other_dataset(stores, tmp_path)
    with moved_dataset(stores) as (old, new):
        moved = runner.invoke(
            stitchtrain_app, ["show", str(run_dir), "--images", "4", "--out", str(out)]
        )
        given = runner.invoke(
            stitchtrain_app,
            ["show", str(run_dir), "--images", "4", "--data", str(new), "--out", str(out)],
        )
        with_data = show_run(run_dir, images=4, data=str(new))
        refused = runner.invoke(
            stitchtrain_app,
            ["show", str(run_dir), "--images", "4", "--data", str(other), "--out", str(out)],
        )
    assert moved.exit_code == 0, moved.output
    assert moved.output.count(f"dataset no longer at {old}") == 1
    assert "image not shown" not in moved.output
    assert given.exit_code == 0, given.output
    assert "no longer" not in given.output and "image not shown" not in given.output
    for got, expected in zip(with_data.images, shown.images, strict=True):
        np.testing.assert_array_equal(got, expected)
    recorded = target.attrs["dataset"]["manifest_hash"]
    assert refused.exit_code == 2 and refused.output.strip().count("\n") == 0
    assert (
        recorded in refused.output and load_dataset(other).manifest_hash("test") in refused.output
    )
