"""Training objectives of the paper (section 3.2) on tensors.

With S the stitch, R^n the first n blocks, T^N the target tail (blocks n+1..N and final norm):

  LFM   L = 1/M sum_i || S(R_src^n(x_i)) - R_tgt^n(x_i) ||_2^2            (stitch position)
  FFM   L = 1/M sum_i || T_tgt^N(S(R_src^n(x_i))) - T_tgt^N(R_tgt^n(x_i)) ||_2^2   (final tokens)
  TLT   L = 1/M sum_i ell(F(x_i), y_i)                     (cross-entropy through the tail)

The squared norms are over the whole (T, D) token matrix. We average over tokens and channels
as well, i.e. ``feature_matching_loss`` = paper loss / (T * D): a constant factor that AdamW is
invariant to (up to its epsilon) and that keeps loss values comparable across model widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "IGNORE_VALUE",
    "feature_matching_loss",
    "classification_loss",
    "segmentation_logits",
    "segmentation_loss",
    "segmentation_targets",
]

IGNORE_INDEX = -1  # mask pixels without a label (and rows of skipped images)
# the "no label" value of label-map files (mmsegmentation's ignore_index). Stores record how
# their masks were mapped (attrs dataset.mask_labels: the ignore value is -1 there already);
# in a store from before that record, masks hold raw values and 255 means "ignore"
IGNORE_VALUE = 255


def feature_matching_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over batch, tokens and channels: ``(B, T, D)`` or ``(B, D)`` -> scalar."""
    return F.mse_loss(predicted.float(), target.float())


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(B, C)`` logits against ``(B,)`` class indices."""
    return F.cross_entropy(logits.float(), labels)


def segmentation_logits(patch_logits: torch.Tensor, mask_size: tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` per-patch logits on an (H, W) grid -> ``(B, C, h, w)`` at the mask size.

    The low-resolution logit map is bilinearly upsampled (paper A.2.5); the grid is square
    unless given by the caller through the number of patches.
    """
    batch, patches, classes = patch_logits.shape
    side = int(round(patches**0.5))
    if side * side != patches:
        raise ValueError(f"Expected a square patch grid. Got {patches} patches instead.")
    grid = patch_logits.transpose(1, 2).reshape(batch, classes, side, side)  # (B, C, H, W)
    return F.interpolate(grid.float(), size=mask_size, mode="bilinear", align_corners=False)


def segmentation_loss(pixel_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy, ``(B, C, h, w)`` vs ``(B, h, w)``, ignoring ``IGNORE_INDEX``."""
    return F.cross_entropy(pixel_logits, masks, ignore_index=IGNORE_INDEX)


def segmentation_targets(
    masks: torch.Tensor, num_classes: int, ignore_value: int | None = None
) -> torch.Tensor:
    """Stored masks -> int64 class indices for the loss and the confusion matrix:
    ``ignore_value`` (a store's raw "no label", e.g. 255; None: none) becomes ``IGNORE_INDEX``;
    any other value outside ``[0, num_classes)`` (and not -1) is refused, naming it, rather
    than left to fail inside cross-entropy or the confusion matrix."""
    from featcache.errors import FeatcacheError

    masks = masks.long()
    if ignore_value is not None:
        masks = masks.masked_fill(masks == ignore_value, IGNORE_INDEX)
    bad = (masks < IGNORE_INDEX) | (masks >= num_classes)
    if bool(bad.any()):
        value = int(masks[bad][0])
        raise FeatcacheError(
            f"Expected mask values in 0..{num_classes - 1} or {IGNORE_INDEX} (ignored). Got mask "
            f"value {value} instead: the training store's masks have fewer classes; declare "
            "the dataset's classes."
        )
    return masks
