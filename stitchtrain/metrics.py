"""Task metrics and the paper's feature distances (Figure 2)."""

from __future__ import annotations

import numpy as np
import torch

from stitchtrain.losses import IGNORE_INDEX

__all__ = ["accuracy", "ConfusionMatrix", "token_distance"]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``(B, C)`` logits whose argmax equals ``(B,)`` labels."""
    return float((logits.argmax(dim=-1) == labels).double().mean())


class ConfusionMatrix:
    """Accumulates pixel counts ``counts[true, predicted]`` for mIoU.

    IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU averages it over the classes present in the
    ground truth of the evaluated set (a class never annotated is not scored; predicting it
    still costs the classes it was confused with through their FP/FN).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, predicted: torch.Tensor, truth: torch.Tensor) -> None:
        keep = truth != IGNORE_INDEX
        truth = truth[keep].long().cpu().numpy()
        predicted = predicted[keep].long().cpu().numpy()
        index = truth * self.num_classes + predicted
        self.counts += np.bincount(index, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def iou(self) -> np.ndarray:
        """Per-class IoU, NaN for classes absent from the ground truth."""
        true_positive = np.diag(self.counts).astype(np.float64)
        present = self.counts.sum(axis=1) > 0
        union = self.counts.sum(axis=0) + self.counts.sum(axis=1) - true_positive
        iou = np.full(self.num_classes, np.nan)
        iou[present] = true_positive[present] / union[present]
        return iou

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else float("nan")


def token_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image RMS token distance ``(B,)``: ||P - Q||_F / sqrt(T) over ``(B, T, D)`` tokens.

    The paper's Figure 2 plots the mean l2 distance between stitched and target features at the
    stitch position and at the output; dividing the Frobenius norm by sqrt(T) makes it the
    root-mean-square of per-token l2 distances, comparable across token counts. ``(B, D)``
    pooled inputs give the plain l2 distance.
    """
    difference = (predicted.float() - target.float()).flatten(1)
    tokens = predicted.shape[1] if predicted.dim() == 3 else 1
    return difference.norm(dim=1) / tokens**0.5
