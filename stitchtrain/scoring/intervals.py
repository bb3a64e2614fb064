"""How far a test score can be trusted: 95% intervals and the below-chance flag.

- Accuracy: the Wilson score interval of k correct out of n images (``wilson_interval``),
  which stays inside [0, 1] and is honest at small n (8/10 -> [0.490, 0.943]).
- mIoU: a percentile bootstrap over test images (``ImageIoU``): each image's per-class
  intersection, ground-truth and predicted pixel counts are kept, ``resamples`` (1000) sets of
  n images are drawn with replacement by a generator seeded with the run's seed, and the
  2.5th and 97.5th percentiles of their mIoU (the run's definition) are the interval.
- Below chance: an accuracy is significantly below chance when the upper Wilson bound lies
  below 1 / classes (``below_chance``). A value merely under 1 / classes on a few images is not.

``score_interval`` is what ``metrics.json`` records as ``test_interval``.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from stitchtrain.model.losses import IGNORE_INDEX
from stitchtrain.scoring.metrics import ConfusionMatrix

__all__ = [
    "LEVEL",
    "BOOTSTRAP_RESAMPLES",
    "ImageIoU",
    "below_chance",
    "score_interval",
    "wilson_interval",
]

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 1000


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` at ``level``; (nan, nan) for
    n = 0."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"Expected successes in 0..{n}. Got {successes} instead.")
    z = _z(level)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def below_chance(successes: int, n: int, classes: int, level: float = LEVEL) -> bool:
    """True when ``successes`` of ``n`` is significantly below chance (1 / ``classes``): the
    upper Wilson bound lies below it."""
    if n <= 0 or classes < 2:
        return False
    return wilson_interval(successes, n, level)[1] < 1 / classes


class ImageIoU:
    """Per-image pixel counts for the bootstrap interval of mIoU (module docstring).

    ``update(predicted, truth)`` takes ONE image's label maps, adds them to ``confusion`` (so
    it stands in for a ``ConfusionMatrix`` wherever images are scored one at a time) and keeps
    the image's per-class intersection, ground-truth and predicted pixel counts."""

    def __init__(self, confusion: ConfusionMatrix) -> None:
        self.confusion = confusion
        self.counts: list[np.ndarray] = []  # per image: (3, classes)

    def update(self, predicted: torch.Tensor, truth: torch.Tensor) -> None:
        self.confusion.update(predicted, truth)
        keep = truth != IGNORE_INDEX
        truth = truth[keep].long().cpu().numpy()
        predicted = predicted[keep].long().cpu().numpy()
        classes = self.confusion.num_classes
        self.counts.append(
            np.stack(
                [
                    np.bincount(truth[truth == predicted], minlength=classes),
                    np.bincount(truth, minlength=classes),
                    np.bincount(predicted, minlength=classes),
                ]
            )
        )

    def interval(
        self,
        definition: str,
        seed: int,
        resamples: int = BOOTSTRAP_RESAMPLES,
        level: float = LEVEL,
    ) -> tuple[float, float]:
        """The percentile bootstrap interval of mIoU (``definition``: see ``ConfusionMatrix``)
        over the images seen; (nan, nan) without images."""
        if not self.counts:
            return math.nan, math.nan
        counts = np.stack(self.counts).astype(np.float64)  # (images, 3, classes)
        images = len(counts)
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(images, np.full(images, 1 / images), size=resamples)
        sums = np.einsum("bn,nkc->bkc", weights.astype(np.float64), counts)
        intersection, truth, predicted = sums[:, 0], sums[:, 1], sums[:, 2]
        union = truth + predicted - intersection
        scored = union > 0 if definition == "mmseg" else truth > 0
        iou = np.where(scored, intersection / np.where(union > 0, union, 1), np.nan)
        some = scored.any(1)  # a resample scoring no class has no mIoU
        if not some.any():
            return math.nan, math.nan
        miou = np.nanmean(iou[some], axis=1)
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(miou, [tail, 100 - tail])
        return float(low), float(high)


def score_interval(
    metric: str,
    n: int,
    low: float,
    high: float,
    method: str,
    *,
    classes: int | None = None,
    correct: int | None = None,
) -> dict[str, Any]:
    """The ``test_interval`` record of ``metrics.json``: the metric it is of, n, the bounds,
    the level and method; for accuracy also the chance level 1 / ``classes`` and whether the
    score is significantly below it (``below_chance``)."""
    record: dict[str, Any] = {
        "metric": metric,
        "n": int(n),
        "low": low,
        "high": high,
        "level": LEVEL,
        "method": method,
    }
    if classes is not None and correct is not None:
        record["chance"] = 1 / classes if classes else math.nan
        record["below_chance"] = below_chance(correct, n, classes)
    return record
