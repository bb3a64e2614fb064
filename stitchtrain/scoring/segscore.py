"""Segmentation scores at the original image resolution (paper A.2.5).

"The linear layer produces a low-resolution logit map (e.g. 24x24 ...), which is then
bilinearly upsampled to the original image resolution": a store keeps masks at the model input
(what training uses), so the test score reads each image's original mask from the dataset the
store was extracted from. The store records that dataset (``dataset.source``, its split and
``manifest_hash``) and its label convention (``dataset.mask_labels``); the dataset is reloaded
and must hash to the same manifest, so the masks scored are the ones the store was made from.

For an original mask of (h, w) pixels, the patch grid covers the box
``Geometry.grid_box(w, h)`` of it (the whole image for a ``squash`` geometry with crop_pct 1;
a centre crop leaves the long side's borders unseen). Per image, the ``(C, rows, cols)`` logit
map is bilinearly resized (``align_corners=False``) to that box in original pixels, and the
labelled pixels inside it are scored; ``scored_pixel_fraction`` reports the share of all
labelled pixels that the box held (1.0 when the model saw the whole image).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from featcache.datasets import MaskLabels, reopen_dataset
from featcache.errors import FeatcacheError
from featcache.images import decode_mask
from featcache.preprocess import Geometry
from featcache.store import FeatureStore
from stitchtrain.model.losses import IGNORE_INDEX
from stitchtrain.scoring.metrics import ConfusionMatrix

__all__ = ["SCORE_RESOLUTIONS", "OriginalMasks"]

SCORE_RESOLUTIONS = ("original", "input")


class OriginalMasks:
    """The original-resolution masks of a store's rows, and the scoring of logit maps on them."""

    def __init__(self, store: FeatureStore) -> None:
        dataset_attrs = store.attrs["dataset"]
        labels = dataset_attrs.get("mask_labels") or {}
        self.labels = MaskLabels.from_dict(labels) if labels else MaskLabels()
        source, split = dataset_attrs["source"], dataset_attrs["split"]
        try:
            dataset = reopen_dataset(dataset_attrs)
            same = dataset.manifest_hash(split) == dataset_attrs["manifest_hash"]
        except FeatcacheError as err:
            raise FeatcacheError(
                f"Scoring {store.url} at the original resolution reads its masks from the "
                f"dataset it was extracted from ({source}), which cannot be read: {err}. Make "
                "it available there, or pass --score-resolution input."
            ) from err
        if not same:
            raise FeatcacheError(
                f"Expected the dataset at {source} (split {split}) to be the one {store.url} "
                "was extracted from, for scoring at the original resolution. Got a dataset "
                "with another manifest hash instead; restore it, or pass --score-resolution "
                "input."
            )
        records = {record.id: record for record in dataset.split(split)}
        self.masks = [records[i].mask for i in store.read("ids")]
        self.geometry = Geometry.from_description(store.attrs["encoder"])
        self.scored_pixels, self.labelled_pixels = 0, 0

    def mask(self, row: int) -> np.ndarray:
        """``(h, w)`` int64 training labels of ``row``'s original mask (-1: ignore)."""
        return self.labels.apply(decode_mask(self.masks[row]))

    def score(self, confusion: ConfusionMatrix, patch_logits: torch.Tensor, rows) -> None:
        """Add the rows' predictions at the original resolution to ``confusion``.

        ``patch_logits``: ``(B, rows * cols, C)`` per-patch logits on the store's grid, one per
        store row in ``rows`` (``(B,)``).
        """
        grid_rows, grid_cols = self.geometry.grid
        maps = patch_logits.float().transpose(1, 2).reshape(len(rows), -1, grid_rows, grid_cols)
        for logits, row in zip(maps, np.asarray(rows).tolist(), strict=True):
            truth = torch.from_numpy(self.mask(row))
            height, width = truth.shape
            left, top, right, bottom = self.geometry.grid_box(width, height)
            x0, y0 = max(0, round(left)), max(0, round(top))
            x1, y1 = min(width, round(right)), min(height, round(bottom))
            inside = truth[y0:y1, x0:x1]
            self.labelled_pixels += int((truth != IGNORE_INDEX).sum())
            self.scored_pixels += int((inside != IGNORE_INDEX).sum())
            if inside.numel() == 0:
                continue
            upsampled = F.interpolate(
                logits[None], size=tuple(inside.shape), mode="bilinear", align_corners=False
            )
            confusion.update(upsampled[0].argmax(0), inside)

    @property
    def scored_fraction(self) -> float:
        return self.scored_pixels / self.labelled_pixels if self.labelled_pixels else float("nan")
