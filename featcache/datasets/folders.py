"""A folder of class subfolders: the folder layout read when no dataset layout matches.

Rules (tested in tests/test_data.py):
  - A folder holds one subfolder per class; labels follow the sorted subfolder names, and images
    (``IMAGE_EXTENSIONS``, any case) are found recursively in each. If every top-level subfolder is
    a split name (``SPLIT_NAMES``), each is a split of class subfolders and the class list is the
    sorted union over splits. Otherwise all images are split "train". Hidden entries are ignored.
  - ``--test-fraction F`` (``DataOptions.test_fraction``) holds out a seeded, class-stratified
    "test" split of "train" (rules in featcache/datasets/holdout.py); refused when the folder
    has a test split.
"""

from __future__ import annotations

import os

from featcache.datasets.core import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    DataOptions,
    Dataset,
    ManifestError,
    MaskLabels,
    Reader,
    Record,
    absolute_path,
    images_under,
    resolver,
    visible_dirs,
)
from featcache.datasets.holdout import hold_out_test

__all__ = ["READER", "detect", "load"]


def detect(root: str, top: list[str]) -> bool:
    """Any folder (this reader comes after the dataset layouts in the reader table)."""
    return True


def load(root: str, options: DataOptions, reduce_zero_label: bool | None = None) -> Dataset:
    """Read the class-folder tree under ``root`` (rules in the module doc)."""
    options.check("a class-folder tree", ("test_fraction",), root)
    top = visible_dirs(root)
    if top and all(name in SPLIT_NAMES for name in top):
        layout = {split: (f"{split}/", visible_dirs(os.path.join(root, split))) for split in top}
    else:
        layout = {"train": ("", top)}
    classes = tuple(sorted({c for _, names in layout.values() for c in names}))
    index = {name: label for label, name in enumerate(classes)}
    resolve = resolver(root)
    records = [
        Record(rid, absolute_path(root, rid), index[name], split, None)
        for split, (prefix, names) in layout.items()
        for name in names
        for rid in images_under(root, prefix + name, resolve)
    ]
    if not records:
        raise ManifestError(
            f"Expected image files ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders of "
            f"{root}. Got none instead."
        )
    mask_labels = MaskLabels(reduce_zero_label=bool(reduce_zero_label))
    dataset = Dataset(root, root, classes, tuple(sorted(records, key=lambda r: r.id)), mask_labels)
    if options.test_fraction is None:
        return dataset
    return hold_out_test(dataset, options.test_fraction, options.subset_seed)


READER = Reader("folder", "folder", detect, load, mask_labels=True)
