"""Segmentation scored at the original image resolution (paper A.2.5): logit maps bilinearly
upsampled onto each image's original mask, read from the dataset the store came from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_ade20k import make_ade20k

from featcache.datasets import load_dataset
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.images import decode_mask
from featcache.store import FeatureStore
from stitchtrain.scoring.metrics import ConfusionMatrix
from stitchtrain.scoring.segscore import OriginalMasks


def _store(tmp_path, resize_mode: str | None) -> FeatureStore:
    """ADE20K-layout val split of two 64 x 48 (4:3) images, dinov2-tiny (8 x 8 grid)."""
    root = tmp_path / "ade"
    if not root.exists():
        make_ade20k(root, train=1, val=2, size=(64, 48))
    config = ExtractConfig(
        models=["dinov2-tiny"],
        data=str(root),
        out=str(tmp_path / f"stores-{resize_mode}"),
        layers=[1],
        split="val",
        resize_mode=resize_mode,
    )
    plan = plan_extraction(config)
    run_extraction(plan)
    return FeatureStore.open(plan.urls[0])


def _constant_logits(rows: int, label: int, classes: int = 150) -> torch.Tensor:
    """(B, 8 * 8, C) patch logits predicting ``label`` everywhere."""
    logits = torch.zeros(rows, 64, classes)
    logits[..., label] = 1.0
    return logits


@pytest.mark.parametrize("resize_mode, fraction", [("squash", 1.0), ("shortest", 0.75)])
def test_original_masks_are_scored_where_the_model_looked(tmp_path, resize_mode, fraction):
    store = _store(tmp_path, resize_mode)
    original = OriginalMasks(store)
    rows = np.arange(store.num_images)
    truths = [original.mask(int(row)) for row in rows]
    assert all(truth.shape == (48, 64) for truth in truths)  # the original size, not 64 x 64
    confusion = ConfusionMatrix(150)
    original.score(confusion, _constant_logits(len(rows), 7), rows)
    assert original.scored_fraction == pytest.approx(fraction, abs=0.01)  # ignore pixels vary
    # every scored pixel was predicted class 7: the column of 7 holds them all
    assert confusion.counts[:, 7].sum() == confusion.counts.sum() == original.scored_pixels
    if resize_mode == "squash":  # the whole image: class 7's true pixels are all TP
        assert confusion.counts[7, 7] == sum(int((t == 7).sum()) for t in truths)


def test_original_masks_apply_the_stores_label_convention(tmp_path):
    store = _store(tmp_path, "squash")
    original = OriginalMasks(store)
    row = list(store.read("ids")).index("images/validation/ADE_val_00000001.jpg")
    raw = np.asarray(decode_mask(tmp_path / "ade/annotations/validation/ADE_val_00000001.png"))
    expected = np.where(raw == 0, -1, raw.astype(np.int64) - 1)  # reduce_zero_label
    np.testing.assert_array_equal(original.mask(row), expected)


def test_upsampled_logits_reproduce_a_mask_they_encode(tmp_path):
    """Logits made from the ground truth at patch resolution score well above chance once
    upsampled, and the per-pixel upsampling is exactly torch's bilinear resize."""
    store = _store(tmp_path, "squash")
    original = OriginalMasks(store)
    truth = torch.from_numpy(original.mask(0))
    small = Image.fromarray(np.where(truth.numpy() < 0, 0, truth.numpy()).astype(np.uint8))
    small = torch.from_numpy(np.array(small.resize((8, 8), Image.NEAREST))).long()
    logits = torch.nn.functional.one_hot(small.flatten(), 150).float()[None]  # (1, 64, 150)
    confusion = ConfusionMatrix(150)
    original.score(confusion, logits, np.array([0]))
    expected = torch.nn.functional.interpolate(
        logits.transpose(1, 2).reshape(1, 150, 8, 8), size=(48, 64), mode="bilinear"
    )[0].argmax(0)
    reference = ConfusionMatrix(150)
    reference.update(expected, truth)
    np.testing.assert_array_equal(confusion.counts, reference.counts)


def test_a_changed_dataset_is_refused_naming_the_way_out(tmp_path):
    store = _store(tmp_path, "squash")
    shutil.copy(
        tmp_path / "ade/images/validation/ADE_val_00000001.jpg",
        tmp_path / "ade/images/validation/ADE_val_00000003.jpg",
    )
    shutil.copy(
        tmp_path / "ade/annotations/validation/ADE_val_00000001.png",
        tmp_path / "ade/annotations/validation/ADE_val_00000003.png",
    )
    assert load_dataset(tmp_path / "ade").split("val")  # still a readable dataset
    with pytest.raises(FeatcacheError, match="another manifest hash.*--score-resolution input"):
        OriginalMasks(store)
    shutil.rmtree(tmp_path / "ade")
    with pytest.raises(FeatcacheError, match="cannot be read.*--score-resolution input"):
        OriginalMasks(store)


def test_segmentation_splits_default_to_the_whole_image(tmp_path):
    store = _store(tmp_path, None)
    assert store.attrs["encoder"]["geometry"]["resize_mode"] == "squash"
    original = OriginalMasks(store)
    original.score(ConfusionMatrix(150), _constant_logits(2, 0), np.arange(2))
    assert original.scored_fraction == 1.0
