"""A held-out test split of a class folder (``--test-fraction F``): seeded, stratified by class.

Rules (tested in tests/test_newcomer_split.py):
  - Only the ``train`` split is split, and only when the dataset has no ``test`` split (a folder
    with ``test/`` is refused: extract that split instead).
  - Class c with n train images gives ``held_out_count(n, F)`` of them to ``test``:
    round(F x n), halves rounded up, but at least 1 and at most n - 1 when n >= 2 (each class
    of 2+ images is tested and still trained on); a class of one image stays in train.
  - Which images: c's train images sorted by id, permuted by
    ``np.random.default_rng([seed, h(c)])`` (the class-balanced subsets' draw,
    featcache/datasets/subsets.py; ``--subset-seed``), the first ``held_out_count`` to test. The
    partition depends only on the seed, the fraction and the class's own images, so it is the
    same whichever split is extracted, on every machine.
  - ``Dataset.selection["test_fraction"]`` records the fraction and the seed, so both splits'
    manifest hashes (hence store ids) say how they were cut, and datasets read without it keep
    their hashes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from featcache.datasets.core import Dataset, ManifestError
from featcache.datasets.subsets import class_seed

__all__ = ["held_out_count", "hold_out_test"]


def held_out_count(n: int, fraction: float) -> int:
    """How many of a class's ``n`` train images go to test (rule in the module doc)."""
    if n < 2:
        return 0
    return min(n - 1, max(1, math.floor(fraction * n + 0.5)))


def hold_out_test(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """``dataset`` with a ``test`` split held out of its ``train`` split (module doc)."""
    present = dataset.splits()
    if "test" in present or "train" not in present:
        got = "a test split" if "test" in present else f"the splits {', '.join(present)}"
        raise ManifestError(
            f"Expected --test-fraction only for data with a train split and no test split (it "
            f"holds one out of train). Got {dataset.source}, which has {got}, instead: extract "
            "its own with --split test."
        )
    by_class: dict[int, list[str]] = {}
    for record in dataset.records:  # sorted by id
        if record.split == "train":
            by_class.setdefault(record.label, []).append(record.id)
    held: set[str] = set()
    for label, ids in by_class.items():
        order = np.random.default_rng(class_seed(seed, dataset.classes[label]))
        chosen = order.permutation(len(ids))[: held_out_count(len(ids), fraction)]
        held.update(ids[i] for i in chosen)
    if not held:
        raise ManifestError(
            f"Expected --test-fraction {fraction:g} to hold out at least one image (one per "
            f"class of 2+ images). Got {dataset.source}, whose classes hold one image each, "
            "instead."
        )
    records = tuple(
        dataclasses.replace(record, split="test") if record.id in held else record
        for record in dataset.records
    )
    selection = {**dataset.selection, "test_fraction": {"fraction": fraction, "seed": seed}}
    return dataclasses.replace(dataset, records=records, selection=selection)
