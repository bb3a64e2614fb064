"""The ADE20K layout (ADEChallengeData2016) and mask label handling (``MaskLabels``).

``make_ade20k`` writes a tiny dataset in the layout ADEChallengeData2016 ships: JPEG images
under ``images/{training,validation}`` and PNG label maps (values 0..150, 0 = "other") of the
same stem under ``annotations/{training,validation}``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.datasets import (
    MASK_IGNORE,
    ManifestError,
    MaskLabelError,
    MaskLabels,
    load_dataset,
)
from featcache.datasets.ade20k import ADE20K_CLASSES
from featcache.images import decode_mask
from featcache.preprocess import Preprocessing
from stitchtrain.model.losses import IGNORE_INDEX
from stitchtrain.scoring.metrics import ConfusionMatrix

_ADE_SPLITS = {"training": "train", "validation": "val"}


def make_ade20k(
    root: str | os.PathLike,
    *,
    train: int = 3,
    val: int = 2,
    size: tuple[int, int] = (20, 14),
    seed: int = 0,
    text_files: bool = True,
) -> Path:
    """Write a tiny ADE20K-layout dataset under ``root`` and return ``root``.

    Each label map holds every value 0..150 at least once when it has room (20 x 14 = 280
    pixels), in a seeded shuffle, so "other" (0) and the last class (150) always appear.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    width, height = size
    for folder, count in (("training", train), ("validation", val)):
        stem = "train" if folder == "training" else "val"
        for i in range(1, count + 1):
            name = f"ADE_{stem}_{i:08d}"
            image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            values = np.resize(np.arange(151, dtype=np.uint8), height * width)
            mask = rng.permutation(values).reshape(height, width)
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "images" / folder / f"{name}.jpg", quality=90)
            Image.fromarray(mask, mode="L").save(root / "annotations" / folder / f"{name}.png")
    if text_files:
        (root / "objectInfo150.txt").write_text(
            "Idx\tRatio\tTrain\tVal\tName\n"
            + "".join(f"{i}\t0.0\t0\t0\t{name}\n" for i, name in enumerate(ADE20K_CLASSES, 1))
        )
        (root / "sceneCategories.txt").write_text("ADE_train_00000001 bathroom\n")
    return root


def _error(source, **options) -> str:
    with pytest.raises(ManifestError) as info:
        load_dataset(source, **options)
    return str(info.value)


# ---- the generator itself -----------------------------------------------------------------


def test_generated_label_maps_round_trip_with_values_0_to_150(tmp_path):
    root = make_ade20k(tmp_path / "ade", train=1, val=0)
    mask = np.asarray(decode_mask(root / "annotations" / "training" / "ADE_train_00000001.png"))
    assert mask.dtype == np.uint8 and mask.shape == (14, 20)
    assert set(np.unique(mask)) == set(range(151))
    image = Image.open(root / "images" / "training" / "ADE_train_00000001.jpg")
    assert image.format == "JPEG" and image.size == (20, 14)


# ---- class names --------------------------------------------------------------------------


def test_ade20k_classes_are_the_150_in_mmsegmentation_order():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:8] == (
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed",
    )  # fmt: skip
    assert ADE20K_CLASSES[12] == "person" and ADE20K_CLASSES[44] == "chest of drawers"
    assert ADE20K_CLASSES[-3:] == ("glass", "clock", "flag")
    assert all(name == name.strip() and name for name in ADE20K_CLASSES)  # mmseg: "bed "


# ---- the reader ---------------------------------------------------------------------------


def test_ade20k_layout_is_detected_with_train_and_val_splits(tmp_path):
    root = make_ade20k(tmp_path / "ADEChallengeData2016")
    data = load_dataset(root)
    assert data.source == data.root == str(root)
    assert data.splits() == ["train", "val"]
    assert data.classes == ADE20K_CLASSES
    assert data.mask_labels == MaskLabels(reduce_zero_label=True, ignore_value=255, num_classes=150)
    assert [r.id for r in data.split("train")] == [
        f"images/training/ADE_train_{i:08d}.jpg" for i in (1, 2, 3)
    ]
    assert [r.id for r in data.split("val")] == [
        f"images/validation/ADE_val_{i:08d}.jpg" for i in (1, 2)
    ]
    for record in data.records:
        folder = {"train": "training", "val": "validation"}[record.split]
        stem = os.path.splitext(os.path.basename(record.id))[0]
        assert record.label == -1
        assert record.path == str(root / record.id) and os.path.isfile(record.path)
        assert record.mask == str(root / "annotations" / folder / f"{stem}.png")
    assert data.has_masks("train") and data.has_masks("val")


def test_ade20k_root_text_files_and_a_missing_split_are_optional(tmp_path):
    root = make_ade20k(tmp_path / "ade", train=0, val=2, text_files=False)
    data = load_dataset(root)
    assert data.splits() == ["val"] and len(data.split("val")) == 2
    assert data.classes == ADE20K_CLASSES


def test_ade20k_ignores_hidden_and_non_png_annotation_files(tmp_path):
    root = make_ade20k(tmp_path / "ade", train=1, val=1)
    (root / "images" / "training" / ".DS_Store").write_text("x")
    (root / "annotations" / "training" / ".ADE_train_00000009.png").write_bytes(b"x")
    (root / "annotations" / "training" / "notes.txt").write_text("x")
    assert len(load_dataset(root).split("train")) == 1


def test_ade20k_image_without_annotation_names_the_file(tmp_path):
    root = make_ade20k(tmp_path / "ade")
    os.remove(root / "annotations" / "validation" / "ADE_val_00000002.png")
    message = _error(root)
    assert "images/validation/ADE_val_00000002.jpg" in message
    assert "annotations/validation/ADE_val_00000002.png" in message


def test_ade20k_annotation_without_image_names_the_file(tmp_path):
    root = make_ade20k(tmp_path / "ade")
    os.remove(root / "images" / "training" / "ADE_train_00000003.jpg")
    message = _error(root)
    assert "annotations/training/ADE_train_00000003.png" in message and "no image" in message


def test_ade20k_two_images_of_one_stem_are_an_error(tmp_path):
    root = make_ade20k(tmp_path / "ade", train=1, val=0)
    shutil.copy(
        root / "images" / "training" / "ADE_train_00000001.jpg",
        root / "images" / "training" / "ADE_train_00000001.png",
    )
    message = _error(root)
    assert "ADE_train_00000001.jpg" in message and "ADE_train_00000001.png" in message


def test_ade20k_annotation_linked_from_outside_the_root_is_an_error(tmp_path):
    root = make_ade20k(tmp_path / "ade", train=1, val=0)
    annotation = root / "annotations" / "training" / "ADE_train_00000001.png"
    shutil.move(annotation, tmp_path / "outside.png")
    annotation.symlink_to(tmp_path / "outside.png")
    message = _error(root)
    assert "resolves to" in message and "outside.png" in message


def test_ade20k_layout_without_any_image_is_an_error(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    assert "Got none" in _error(tmp_path)


def test_images_and_annotations_without_split_folders_are_class_folders(tmp_path):
    Image.new("RGB", (4, 4)).save(_mkdir(tmp_path / "images") / "a.png")
    Image.new("RGB", (4, 4)).save(_mkdir(tmp_path / "annotations") / "b.png")
    data = load_dataset(tmp_path)
    assert data.classes == ("annotations", "images") and data.mask_labels == MaskLabels()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_ade20k_without_reduce_zero_label_scores_other_as_class_0(tmp_path):
    root = make_ade20k(tmp_path / "ade")
    data = load_dataset(root, reduce_zero_label=False)
    assert data.classes == ("other", *ADE20K_CLASSES)
    assert data.mask_labels == MaskLabels(
        reduce_zero_label=False, ignore_value=255, num_classes=151
    )
    assert load_dataset(root, reduce_zero_label=None).mask_labels.reduce_zero_label is True


def test_reduce_zero_label_enters_the_manifest_hash(tmp_path):
    root = make_ade20k(tmp_path / "a")
    shutil.copytree(root, tmp_path / "moved" / "b")
    reduced = load_dataset(root).manifest_hash("train")
    assert load_dataset(root, reduce_zero_label=True).manifest_hash("train") == reduced
    assert load_dataset(tmp_path / "moved" / "b").manifest_hash("train") == reduced
    assert load_dataset(root, reduce_zero_label=False).manifest_hash("train") != reduced


# ---- MaskLabels ---------------------------------------------------------------------------


def test_reduce_zero_label_maps_0_to_ignore_and_k_to_k_minus_1():
    labels = MaskLabels(reduce_zero_label=True, ignore_value=255, num_classes=150)
    raw = np.array([[0, 1, 2, 150], [255, 75, 0, 1]], dtype=np.uint8)
    out = labels.apply(raw)
    assert out.dtype == np.int64 and out.shape == raw.shape
    np.testing.assert_array_equal(out, [[-1, 0, 1, 149], [-1, 74, -1, 0]])


def test_without_reduction_values_are_labels_and_the_ignore_value_is_ignored():
    labels = MaskLabels(reduce_zero_label=False, ignore_value=255, num_classes=151)
    raw = np.array([[0, 1, 150, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(labels.apply(raw), [[0, 1, 150, -1]])
    # the manifest default: no reduction, 255 ignored, no declared class count
    assert MaskLabels() == MaskLabels(reduce_zero_label=False, ignore_value=255, num_classes=None)
    np.testing.assert_array_equal(MaskLabels().apply(raw), [[0, 1, 150, -1]])
    no_ignore = MaskLabels(ignore_value=None)
    np.testing.assert_array_equal(no_ignore.apply(raw), [[0, 1, 150, 255]])


@pytest.mark.parametrize(
    "labels, raw, bad",
    [
        (MaskLabels(True, 255, 150), [[0, 151, 3, 200, 200]], "151, 200"),  # beyond 150 classes
        (MaskLabels(False, 255, 151), [[151, 0]], "151"),
        (MaskLabels(False, 255, None), [[40000, 1]], "40000"),  # not storable as int16
        (MaskLabels(False, 255, None), [[-2, 1]], "-2"),
        (MaskLabels(True, None, 150), [[255, 1]], "255"),  # 255 is only ignored when declared
    ],
)
def test_values_outside_the_classes_are_refused_not_new_classes(labels, raw, bad):
    with pytest.raises(MaskLabelError) as info:
        labels.apply(np.array(raw, dtype=np.int64))
    message = str(info.value)
    assert f"Got values {bad}" in message and "pixel" in message


def test_apply_reads_pil_label_maps_and_refuses_colour_or_float_ones():
    labels = MaskLabels(reduce_zero_label=True, ignore_value=255, num_classes=150)
    raw = np.array([[0, 1], [150, 255]], dtype=np.uint8)
    expected = [[-1, 0], [149, -1]]
    np.testing.assert_array_equal(labels.apply(Image.fromarray(raw, mode="L")), expected)
    palette = Image.fromarray(raw, mode="L").convert("P")
    np.testing.assert_array_equal(labels.apply(palette), expected)
    sixteen = Image.fromarray(raw.astype(np.uint16))
    np.testing.assert_array_equal(labels.apply(sixteen), expected)
    with pytest.raises(MaskLabelError, match="single-channel"):
        labels.apply(Image.new("RGB", (2, 2)))
    with pytest.raises(MaskLabelError, match="integer"):
        labels.apply(np.zeros((2, 2), dtype=np.float32))


@pytest.mark.parametrize(
    "fields",
    [
        dict(reduce_zero_label=1),
        dict(ignore_value="255"),
        dict(ignore_value=True),
        dict(num_classes=0),
        dict(num_classes=40000),
    ],
)
def test_mask_labels_refuse_bad_fields(fields):
    with pytest.raises(ValueError, match="Expected"):
        MaskLabels(**fields)


def test_mask_labels_round_trip_through_a_dict():
    labels = MaskLabels(reduce_zero_label=True, ignore_value=255, num_classes=150)
    assert labels.to_dict() == {"reduce_zero_label": True, "ignore_value": 255, "num_classes": 150}
    assert MaskLabels.from_dict(labels.to_dict()) == labels
    assert MaskLabels.from_dict(MaskLabels().to_dict()) == MaskLabels()


def test_ignore_is_the_loss_store_and_confusion_matrix_convention():
    assert MASK_IGNORE == IGNORE_INDEX == -1
    labels = MaskLabels(reduce_zero_label=True, ignore_value=255, num_classes=3)
    truth = labels.apply(np.array([[0, 1, 2, 3, 255]]))
    assert np.array_equal(truth.astype(np.int16), truth)  # stores keep int16, fill -1
    matrix = ConfusionMatrix(num_classes=3)
    matrix.update(torch.tensor([[2, 0, 1, 2, 0]]), torch.from_numpy(truth))
    assert matrix.counts.sum() == 3 and np.trace(matrix.counts) == 3


def test_apply_commutes_with_the_mask_geometry():
    """Relabelling after ``Preprocessing.mask`` equals relabelling before it (nearest neighbour
    only picks pixels), so extraction may apply ``MaskLabels`` to the preprocessed array."""
    rng = np.random.default_rng(3)
    raw = Image.fromarray(rng.integers(0, 151, size=(37, 53), dtype=np.uint8), mode="L")
    labels = MaskLabels(reduce_zero_label=True, ignore_value=255, num_classes=150)
    for mode, crop in (("shortest", 0.875), ("squash", 1.0)):
        pre = Preprocessing((24, 24), mode, crop, "bicubic", (0.5,) * 3, (0.5,) * 3)
        after = labels.apply(pre.mask(raw))
        before = pre.mask(Image.fromarray(labels.apply(raw).astype(np.int32), mode="I"))
        np.testing.assert_array_equal(after, before)


def test_extracting_ade20k_stores_reduced_labels_and_the_150_classes(tmp_path):
    """The reader's labels reach the store: 0 ("other") and 255 become -1, k becomes k-1,
    the store declares the 150 classes, and a value outside them skips the image, named."""
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction
    from featcache.store import FeatureStore

    root = make_ade20k(tmp_path / "ade", train=3, val=1, size=(64, 48))
    bad = root / "annotations" / "training" / "ADE_train_00000003.png"
    Image.fromarray(np.full((48, 64), 200, np.uint8), mode="L").save(bad)
    config = ExtractConfig(
        models=["dinov2-tiny"],
        data=str(root),
        out=str(tmp_path / "stores"),
        layers=[1],
        split="train",
        on_bad_image="skip",
    )
    plan = plan_extraction(config)
    result = run_extraction(plan)
    store = FeatureStore.open(plan.urls[0])
    assert store.attrs["dataset"]["classes"] == list(ADE20K_CLASSES)
    assert store.attrs["dataset"]["mask_labels"]["reduce_zero_label"] is True
    (skipped,) = result["stores"][0]["skipped"]
    assert skipped["id"] == "images/training/ADE_train_00000003.jpg"
    assert str(bad) in skipped["reason"] and "200" in skipped["reason"]
    masks, valid = store.read("masks"), store.read("valid")
    assert valid.sum() == 2
    kept = masks[valid]
    assert kept.min() == -1 and kept.max() <= 149 and (kept >= 0).any()
    raw = np.asarray(decode_mask(root / "annotations" / "training" / "ADE_train_00000001.png"))
    row = list(store.read("ids")).index("images/training/ADE_train_00000001.jpg")
    expected = plan.encoders[0].preprocessing.mask(Image.fromarray(raw, mode="L"))
    expected = expected.astype(np.int64)
    expected = np.where(expected == 0, -1, expected - 1)
    np.testing.assert_array_equal(masks[row], expected)
