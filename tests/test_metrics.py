"""Losses and metrics on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import torch

from stitchtrain.losses import (
    IGNORE_INDEX,
    feature_matching_loss,
    segmentation_logits,
    segmentation_loss,
)
from stitchtrain.metrics import ConfusionMatrix, accuracy, token_distance


def test_miou_hand_made():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    matrix = ConfusionMatrix(num_classes=4)  # class 3 never annotated: not scored
    matrix.update(predicted, truth)
    # class 0: TP 1, FP 1 (pixel of 2 predicted 0), FN 1 -> 1/3
    # class 1: TP 3, FP 1, FN 0 -> 3/4 ; class 2: TP 1, FP 0, FN 1 -> 1/2
    np.testing.assert_allclose(matrix.iou()[:3], [1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(matrix.iou()[3])
    assert math.isclose(matrix.miou(), (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert math.isclose(matrix.pixel_accuracy(), 5 / 7)


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
