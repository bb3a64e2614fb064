"""fMoW-RGB (Functional Map of the World, RGB variant): its folder layout and object boxes.

Layout, as fMoW-rgb ships it::

    <root>/train/<category>/<category>_<loc>/<category>_<loc>_<n>_rgb.jpg
                                            /<category>_<loc>_<n>_rgb.json
    <root>/val/...     (same)
    <root>/test/..., <root>/seq/...   (no category folders: ignored)

Rules (tested in tests/test_datasets_paper.py):
  - Detected when ``train/`` or ``val/`` holds a category folder whose first location folder
    holds a ``*_rgb.jpg``. Splits "train" and "val" (and "test" when it has category folders);
    in each, every ``<category>/<category>_*/<category>_*_rgb.jpg`` is an image of class
    ``<category>``, the classes being the sorted union of categories. Other files are ignored.
  - ``--crop box`` (the default, the usual fMoW practice): the image is cropped to its object
    box, read from the ``_rgb.json`` of the same stem: the entry of ``bounding_boxes`` whose
    ``category`` is the folder's (or the only entry), ``"box": [x, y, w, h]`` in pixels, which
    becomes ``Record.box`` = (x, y, x + w, y + h). A missing or unreadable JSON (not UTF-8,
    invalid, nested too deep), no such box, or a box value that is not a finite number (NaN,
    Infinity) is a ``ManifestError`` naming the file and the value. ``--crop whole`` reads no JSON.
  - The crop enters the manifest hash (``selection["crop"]``, and each box in its row).
  - Paths stay inside the root (symlinks resolved), as for class folders.
"""

from __future__ import annotations

import math
import os

from featcache.datasets.core import (
    DataOptions,
    Dataset,
    ManifestError,
    Reader,
    Record,
    absolute_path,
    read_json,
    relative_id,
    resolver,
    visible_dirs,
)

__all__ = ["FMOW_SPLITS", "READER", "detect", "load"]

FMOW_SPLITS = ("train", "val", "test")
_SUFFIX = "_rgb.jpg"


def detect(root: str, top: list[str]) -> bool:
    """``train/`` or ``val/`` -> a category folder -> its first location folder -> a
    ``*_rgb.jpg`` (looks at one folder of each level only)."""
    for split in ("train", "val"):
        if split not in top:
            continue
        categories = visible_dirs(os.path.join(root, split))
        if not categories:
            continue
        folder = os.path.join(root, split, categories[0])
        locations = visible_dirs(folder)
        if locations and any(
            name.endswith(_SUFFIX) for name in os.listdir(os.path.join(folder, locations[0]))
        ):
            return True
    return False


def _box(json_path: str, category: str) -> tuple[int, int, int, int]:
    """The object box of one image's ``_rgb.json`` as (left, top, right, bottom)."""
    expected = (
        f"a readable fMoW metadata file {json_path} whose bounding_boxes hold one entry of "
        f'category {category!r} (or only one entry) with "box": [x, y, w, h] of finite '
        "numbers, w and h > 0"
    )
    meta = read_json(json_path, f"{expected} (--crop whole needs none)")
    boxes = meta.get("bounding_boxes") if isinstance(meta, dict) else None
    boxes = boxes if isinstance(boxes, list) else []
    entries = [b for b in boxes if isinstance(b, dict) and b.get("category") == category]
    if not entries and len(boxes) == 1 and isinstance(boxes[0], dict):
        entries = boxes
    box = entries[0].get("box") if entries else None
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(_finite_number(v) for v in box)
        and box[2] > 0
        and box[3] > 0
    ):
        found = f"box {box!r}" if entries else f"{len(boxes)} bounding_boxes, none of them"
        raise ManifestError(f"Expected {expected}. Got {found} instead.")
    x, y, w, h = (int(round(v)) for v in box)
    return x, y, x + w, y + h


def _finite_number(value: object) -> bool:
    """An int or a finite float (JSON's NaN / Infinity extensions parse as floats)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def load(root: str, options: DataOptions) -> Dataset:
    """Read the fMoW-RGB layout under ``root`` (rules in the module doc)."""
    options.check("fMoW-RGB", ("crop",), root)
    crop = options.crop or "box"
    if crop not in ("box", "whole"):
        raise ManifestError(
            f"Expected --crop box or whole for fMoW-RGB ({root}). Got --crop {crop} (an "
            "FGVC-Aircraft option) instead."
        )
    resolve = resolver(root)
    expected = f"fMoW images that resolve inside the data root {root}"
    found = []  # (id, category, split)
    for split in FMOW_SPLITS:
        if not os.path.isdir(os.path.join(root, split)):
            continue
        for category in visible_dirs(os.path.join(root, split)):
            for location in visible_dirs(os.path.join(root, split, category)):
                if not location.startswith(category + "_"):
                    continue
                folder = os.path.join(root, split, category, location)
                resolve(folder, expected, folder)
                for name in sorted(os.listdir(folder)):
                    if name.startswith(location + "_") and name.endswith(_SUFFIX):
                        path = os.path.join(folder, name)
                        resolve(path, expected, path)
                        found.append((relative_id(root, path), category, split))
    if not found:
        raise ManifestError(
            f"Expected fMoW-RGB images <split>/<category>/<category>_<loc>/*{_SUFFIX} under "
            f"{root}. Got none instead."
        )
    classes = tuple(sorted({category for _, category, _ in found}))
    index = {name: label for label, name in enumerate(classes)}
    records = []
    for rid, category, split in found:
        path = absolute_path(root, rid)
        box = None
        if crop == "box":
            json_path = path[: -len(".jpg")] + ".json"
            resolve(json_path, expected, json_path)
            box = _box(json_path, category)
        records.append(Record(rid, path, index[category], split, None, box=box))
    records.sort(key=lambda r: r.id)
    return Dataset(root, root, classes, tuple(records), selection={"crop": crop}, format="fmow-rgb")


READER = Reader("fmow-rgb", "folder", detect, load)
