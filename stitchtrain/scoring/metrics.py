"""Task metrics and the paper's feature distances (Figure 2)."""

from __future__ import annotations

import numpy as np
import torch

from stitchtrain.model.losses import IGNORE_INDEX

__all__ = ["MIOU_DEFINITIONS", "accuracy", "ConfusionMatrix", "token_distance"]

MIOU_DEFINITIONS = ("mmseg", "gt-present")  # the first is the default; see ConfusionMatrix


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``(B, C)`` logits whose argmax equals ``(B,)`` labels."""
    return float((logits.argmax(dim=-1) == labels).double().mean())


class ConfusionMatrix:
    """Accumulates pixel counts ``counts[true, predicted]`` over a dataset for mIoU.

    Truth pixels equal to ``IGNORE_INDEX`` (-1) are dropped; every other truth and predicted
    value must lie in ``0..num_classes - 1`` (``update`` refuses others, so no pixel lands in
    another class's cell). Per class, I_c = TP_c and U_c = TP_c + FP_c + FN_c, both summed over
    every pixel seen; IoU_c = I_c / U_c. ``definition`` chooses which classes mIoU averages:

      "mmseg"       (default) every class with U_c > 0, as mmsegmentation's
                    ``total_area_intersect / total_area_union`` then nanmean: a class predicted
                    but absent from the ground truth scores 0.
      "gt-present"  only classes present in the ground truth of the evaluated set: a class never
                    annotated is not scored (predicting it still costs the classes it was
                    confused with through their FP/FN).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, predicted: torch.Tensor, truth: torch.Tensor) -> None:
        """Add same-shape integer ``predicted`` and ``truth`` label maps (any shape)."""
        keep = truth != IGNORE_INDEX
        truth = truth[keep].long().cpu().numpy()
        predicted = predicted[keep].long().cpu().numpy()
        for name, values in (("truth", truth), ("predicted", predicted)):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                bad = values[(values < 0) | (values >= self.num_classes)]
                raise ValueError(
                    f"Expected {name} labels in 0..{self.num_classes - 1} (or truth "
                    f"{IGNORE_INDEX}: ignored). Got {np.unique(bad)[:10].tolist()} instead."
                )
        index = truth * self.num_classes + predicted
        self.counts += np.bincount(index, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def iou(self, definition: str = "mmseg") -> np.ndarray:
        """Per-class IoU, NaN for the classes ``definition`` does not score (see the class doc):
        "mmseg" those with an empty union, "gt-present" those absent from the ground truth."""
        _check_definition(definition)
        intersection = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(axis=0) + self.counts.sum(axis=1) - intersection
        scored = union > 0 if definition == "mmseg" else self.counts.sum(axis=1) > 0
        iou = np.full(self.num_classes, np.nan)
        iou[scored] = intersection[scored] / union[scored]
        return iou

    def miou(self, definition: str = "mmseg") -> float:
        """Mean of ``iou(definition)`` over the scored classes; NaN when none is scored."""
        iou = self.iou(definition)
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else float("nan")


def _check_definition(definition: str) -> None:
    if definition not in MIOU_DEFINITIONS:
        raise ValueError(
            f"Expected an mIoU definition in {MIOU_DEFINITIONS}. Got {definition!r} instead."
        )


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
