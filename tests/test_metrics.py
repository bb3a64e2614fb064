"""Losses and metrics on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stitchtrain.model.losses import (
    IGNORE_INDEX,
    feature_matching_loss,
    segmentation_logits,
    segmentation_loss,
)
from stitchtrain.scoring.metrics import MIOU_DEFINITIONS, ConfusionMatrix, accuracy, token_distance


def test_miou_hand_made():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    matrix = ConfusionMatrix(num_classes=4)  # class 3 never annotated: not scored
    matrix.update(predicted, truth)
    # class 0: TP 1, FP 1 (pixel of 2 predicted 0), FN 1 -> 1/3
    # class 1: TP 3, FP 1, FN 0 -> 3/4 ; class 2: TP 1, FP 0, FN 1 -> 1/2
    for definition in MIOU_DEFINITIONS:  # class 3 neither annotated nor predicted: both agree
        np.testing.assert_allclose(matrix.iou(definition)[:3], [1 / 3, 3 / 4, 1 / 2])
        assert math.isnan(matrix.iou(definition)[3])
        assert math.isclose(matrix.miou(definition), (1 / 3 + 3 / 4 + 1 / 2) / 3)
    np.testing.assert_array_equal(matrix.iou(), matrix.iou("mmseg"))
    assert math.isclose(matrix.pixel_accuracy(), 5 / 7)


def _pixels(counts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (predicted, truth) pixels with ``counts[true][predicted]`` pixels of each pair."""
    pairs = [(p, t) for t, row in enumerate(counts) for p, n in enumerate(row) for _ in range(n)]
    predicted, truth = zip(*pairs, strict=True)
    return torch.tensor(predicted), torch.tensor(truth)


def test_miou_definitions_differ_on_a_predicted_but_absent_class():
    # 4 classes. Ground truth has classes 0 and 1 only; class 2 is predicted but never
    # annotated; class 3 is neither. counts[true][predicted]:
    #            pred 0  pred 1  pred 2  pred 3
    #   true 0     16      2       5       0      row 23
    #   true 1      2     16       5       0      row 23
    #   true 2      0      0       0       0
    #   true 3      0      0       0       0
    #   column     18     18      10       0
    # class 0: I 16, U = 23 + 18 - 16 = 25 -> 0.64 ; class 1: the same -> 0.64
    # class 2: I 0, U = 0 + 10 - 0 = 10 -> 0 ; class 3: U = 0 -> skipped (NaN)
    # gt-present: mean(0.64, 0.64) = 0.640 ; mmseg: mean(0.64, 0.64, 0) = 0.4267
    predicted, truth = _pixels([[16, 2, 5, 0], [2, 16, 5, 0]])
    # ignored pixels count for nothing, whatever is predicted there (3 included)
    predicted = torch.cat([predicted, torch.tensor([2, 3, 3, 0])])
    truth = torch.cat([truth, torch.full((4,), IGNORE_INDEX)])
    matrix = ConfusionMatrix(num_classes=4)
    matrix.update(predicted.reshape(2, -1), truth.reshape(2, -1))
    np.testing.assert_allclose(matrix.iou("mmseg"), [0.64, 0.64, 0.0, np.nan])
    np.testing.assert_allclose(matrix.iou("gt-present"), [0.64, 0.64, np.nan, np.nan])
    assert math.isclose(matrix.miou("gt-present"), 0.64)
    assert math.isclose(matrix.miou("mmseg"), 1.28 / 3) and round(matrix.miou(), 3) == 0.427
    assert math.isclose(matrix.pixel_accuracy(), 32 / 46)


def test_miou_definitions_are_listed_and_others_refused():
    assert MIOU_DEFINITIONS == ("mmseg", "gt-present")
    matrix = ConfusionMatrix(num_classes=2)
    with pytest.raises(ValueError, match="gt-present"):
        matrix.miou("present")
    with pytest.raises(ValueError, match="mmseg"):
        matrix.iou("voc")
    for definition in MIOU_DEFINITIONS:  # nothing accumulated: no class has a union
        assert math.isnan(matrix.miou(definition))
        assert np.isnan(matrix.iou(definition)).all()


def test_update_refuses_labels_outside_the_classes():
    matrix = ConfusionMatrix(num_classes=3)
    with pytest.raises(ValueError, match="truth"):
        matrix.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="predicted"):
        matrix.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="truth"):
        matrix.update(torch.tensor([0, 1]), torch.tensor([0, -2]))
    matrix.update(torch.tensor([0, 5]), torch.tensor([0, IGNORE_INDEX]))  # ignored: not checked
    assert matrix.counts.sum() == 1


def _mmseg_intersect_and_union(pred, label, num_classes, ignore_index):
    """mmseg's ``intersect_and_union`` (numpy version of mmseg.core.evaluation.metrics)."""
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    bins = dict(bins=num_classes, range=(0, num_classes - 1))
    area_intersect = np.histogram(intersect, **bins)[0]
    area_pred = np.histogram(pred, **bins)[0]
    area_label = np.histogram(label, **bins)[0]
    return area_intersect, area_pred + area_label - area_intersect


def _mmseg_miou(preds, labels, num_classes, ignore_index=255):
    """``total_area_intersect / total_area_union`` over the dataset, then nanmean."""
    total_intersect = np.zeros(num_classes)
    total_union = np.zeros(num_classes)
    for pred, label in zip(preds, labels, strict=True):
        intersect, union = _mmseg_intersect_and_union(pred, label, num_classes, ignore_index)
        total_intersect += intersect
        total_union += union
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = total_intersect / total_union
    return iou, float(np.nanmean(iou))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmseg_miou_matches_an_independent_implementation(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    preds, labels = [], []
    matrix = ConfusionMatrix(num_classes)
    for _ in range(5):
        shape = tuple(rng.integers(5, 12, size=2))
        # ground truth from classes 0..4 only (5, 6 absent), predictions from all 7 but 6
        label = rng.integers(0, 5, size=shape)
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, 6, size=shape))
        ignored = rng.random(shape) < 0.15
        truth = np.where(ignored, IGNORE_INDEX, label)
        matrix.update(torch.from_numpy(pred), torch.from_numpy(truth))
        preds.append(pred)
        labels.append(np.where(ignored, 255, label))  # mmseg's ignore value
    iou, miou = _mmseg_miou(preds, labels, num_classes)
    assert np.isnan(iou[6]) and iou[5] == 0.0  # predicted but absent counts as 0
    np.testing.assert_allclose(matrix.iou("mmseg"), iou)
    assert math.isclose(matrix.miou("mmseg"), miou)
    assert math.isclose(matrix.miou(), miou)
    assert math.isclose(matrix.miou("gt-present"), float(np.nanmean(iou[:5])))


def test_accuracy_and_distances():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert math.isclose(accuracy(logits, torch.tensor([0, 1, 1])), 2 / 3)
    a = torch.zeros(2, 4, 3)
    b = torch.zeros(2, 4, 3)
    b[0, :, 0] = 2.0  # every token of image 0 is 2 away
    torch.testing.assert_close(token_distance(a, b), torch.tensor([2.0, 0.0]))
    assert math.isclose(float(feature_matching_loss(a, b)), 4.0 * 4 / 24, rel_tol=1e-6)


def test_segmentation_logits_upsample_and_ignore():
    patch_logits = torch.zeros(1, 4, 3)
    patch_logits[0, :, 1] = 5.0  # every patch says class 1
    pixels = segmentation_logits(patch_logits, (8, 8))
    assert pixels.shape == (1, 3, 8, 8) and (pixels.argmax(1) == 1).all()
    masks = torch.full((1, 8, 8), IGNORE_INDEX)
    masks[0, 0, 0] = 1
    expected = torch.nn.functional.cross_entropy(pixels[:, :, 0, 0], torch.tensor([1]))
    torch.testing.assert_close(segmentation_loss(pixels, masks), expected)
