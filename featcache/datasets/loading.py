"""``load_dataset``: ``--data`` -> ``Dataset``, by the first reader of ``READERS`` that detects it.

The reader table, in detection order (tested in tests/test_data.py, test_ade20k.py,
test_corpora.py and test_datasets_paper.py; each reader's rules are in its module):
  - The value as given, before it is resolved: webdataset ``.tar`` shards (a path, brace
    pattern or glob, local or fsspec URL: featcache/datasets/wds.py), then Hugging Face parquet
    (a ``.parquet`` file or glob, or a folder holding parquet files:
    featcache/datasets/hf_parquet.py). Their records read the image's bytes through
    ``Record.member``.
  - A folder: fMoW-RGB, iNaturalist 2021 and FGVC-Aircraft (featcache/datasets/fmow.py,
    inat.py and aircraft.py), then ADE20K (ade20k.py), else a class-folder tree (folders.py).
  - Anything else: a LLaVA-style ``.json`` list of image paths (featcache/datasets/llava.py),
    else a ``.csv`` / ``.jsonl`` manifest (manifests.py), which also names what ``--data``
    accepts when it is none of these.
``DataOptions`` carries the readers' options (crop, select, level, ...) and the class-balanced
subset (featcache/datasets/subsets.py) that ``load_dataset`` applies last.
"""

from __future__ import annotations

import os
from typing import Any

from featcache.datasets import (
    ade20k,
    aircraft,
    fmow,
    folders,
    hf_parquet,
    inat,
    llava,
    manifests,
    wds,
)
from featcache.datasets.core import DataOptions, Dataset, ManifestError, Reader, visible_dirs
from featcache.datasets.subsets import class_balanced

__all__ = ["READERS", "load_dataset", "reopen_dataset"]

# The readers in detection order: the first whose detect says yes reads --data. Readers of
# scope "path" see the value as given; then "folder" readers see a folder, "file" readers
# anything else; the last folder and the last file reader take whatever is left.
READERS: tuple[Reader, ...] = (
    wds.READER,
    hf_parquet.READER,
    fmow.READER,
    inat.READER,
    aircraft.READER,
    ade20k.READER,
    folders.READER,
    llava.READER,
    manifests.READER,
)


def load_dataset(
    path: str | os.PathLike,
    reduce_zero_label: bool | None = None,
    options: DataOptions | None = None,
) -> Dataset:
    """Read a class-folder tree, the ADE20K, fMoW-RGB, iNaturalist 2021 or FGVC-Aircraft
    layout, a ``.csv`` or ``.jsonl`` manifest, a LLaVA-style ``.json``, Hugging Face parquet or
    webdataset tar shards (rules in the module doc and the layout's module), then take the
    class-balanced subset ``options`` asks for. ``reduce_zero_label``
    None takes the layout's default (ADE20K: on; others: off); True / False sets
    ``Dataset.mask_labels.reduce_zero_label``."""
    options = options or DataOptions()
    dataset = _load_layout(os.fspath(path), reduce_zero_label, options)
    return class_balanced(dataset, options) if options.per_class is not None else dataset


def reopen_dataset(recorded: dict[str, Any]) -> Dataset:
    """The dataset a store was extracted from, read as it was: ``recorded`` is the store's
    ``dataset`` attribute (its ``source``, ``mask_labels.reduce_zero_label`` and the reader and
    subset ``options``). Callers compare ``manifest_hash`` to know the rows are the same."""
    reduce = (recorded.get("mask_labels") or {}).get("reduce_zero_label")
    options = DataOptions.from_dict(recorded.get("options") or {})
    return load_dataset(recorded["source"], reduce_zero_label=reduce, options=options)


def _load_layout(path: str, reduce_zero_label: bool | None, options: DataOptions) -> Dataset:
    """Read ``path`` with the first reader of ``READERS`` that detects it."""
    if reduce_zero_label is not None and not isinstance(reduce_zero_label, bool):
        raise ManifestError(
            f"Expected reduce_zero_label True, False or None. Got {reduce_zero_label!r} instead."
        )
    source = os.path.abspath(path)
    folder: bool | None = None  # whether source is a folder, asked once, after the path readers
    top: list[str] | None = None  # the folder's visible subfolders, listed once
    for reader in READERS:
        if reader.scope == "path":
            detected, where = reader.detect(path), path
        else:
            folder = os.path.isdir(source) if folder is None else folder
            if folder != (reader.scope == "folder"):
                continue
            if folder:
                top = visible_dirs(source) if top is None else top
                detected = reader.detect(source, top)
            else:
                detected = reader.detect(source)
            where = source
        if detected:
            if reader.mask_labels:
                return reader.load(where, options, reduce_zero_label=reduce_zero_label)
            return reader.load(where, options)
    raise AssertionError("the last folder reader and the last file reader read anything")
