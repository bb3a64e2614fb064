"""FGVC-Aircraft (fgvc-aircraft-2013b): image lists per split and class level, and boxes.

Layout, as fgvc-aircraft-2013b ships it (the root is the folder holding ``data/``, or
``data/`` itself)::

    data/images/<id>.jpg
    data/images_{variant,family,manufacturer}_{train,val,test,trainval}.txt   "<id> <name>"
    data/{variants,families,manufacturers}.txt                                one name a line
    data/images_box.txt                                  "<id> <xmin> <ymin> <xmax> <ymax>"

Rules (tested in tests/test_datasets_paper.py):
  - Detected when the root or its ``data/`` holds ``images/`` and an
    ``images_variant_<split>.txt``. Splits "train", "val" and "test" from the lists of the
    chosen level (``--level variant`` by default, ``family`` or ``manufacturer``); the
    ``trainval`` list (train + val again) is read only when train or val has no list.
  - A line is "<id> <class name>" (names hold spaces); the image is ``images/<id>.jpg``. The
    classes are ``variants.txt`` / ``families.txt`` / ``manufacturers.txt`` in file order
    (torchvision's order), or the sorted names when that file is absent; a name outside it,
    a malformed line, a line that is not UTF-8 or an id listed twice is a ``ManifestError``
    naming file and line.
  - Every image carries a 20-pixel copyright banner at the bottom, which the dataset's README
    asks users to remove. ``--crop banner`` does (``Record.box`` = (0, 0, w, h - 20), the
    size read from each JPEG's header at planning; an unreadable header is a
    ``ManifestError``); ``--crop box`` crops to the aircraft's box in ``images_box.txt``
    (1-based, inclusive: ``Record.box`` = (xmin - 1, ymin - 1, xmax, ymax)); ``--crop whole``,
    the default, keeps the whole image, banner included, as torchvision's ``FGVCAircraft``
    and most foundation-model evaluations read it. The level and the crop enter the manifest
    hash.
"""

from __future__ import annotations

import os

from featcache.datasets.core import (
    DataOptions,
    Dataset,
    ManifestError,
    Reader,
    Record,
    absolute_path,
    read_text,
    relative_id,
    resolver,
)

__all__ = ["AIRCRAFT_LEVELS", "BANNER_HEIGHT", "READER", "detect", "load"]

AIRCRAFT_LEVELS = {"variant": "variants", "family": "families", "manufacturer": "manufacturers"}
_SPLITS = ("train", "val", "test")
BANNER_HEIGHT = 20  # pixels of copyright banner at the bottom of every image


def _data_folder(root: str) -> str | None:
    for folder in (os.path.join(root, "data"), root):
        if os.path.isdir(os.path.join(folder, "images")) and any(
            os.path.isfile(os.path.join(folder, f"images_variant_{s}.txt"))
            for s in (*_SPLITS, "trainval")
        ):
            return folder
    return None


def detect(root: str, top: list[str]) -> bool:
    """``images/`` beside an ``images_variant_<split>.txt``, in the root or its ``data/``."""
    return ("data" in top or "images" in top) and _data_folder(root) is not None


def _lines(file: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines of a UTF-8 list (``read_text``)."""
    lines = read_text(file).splitlines()
    return [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]


def _boxes(file: str) -> dict[str, tuple[int, int, int, int]]:
    if not os.path.isfile(file):
        raise ManifestError(
            f"Expected {file} for --crop box (or --crop whole). Got no such file instead."
        )
    boxes = {}
    for number, line in _lines(file):
        parts = line.split()
        try:
            xmin, ymin, xmax, ymax = (int(v) for v in parts[1:])
        except ValueError:
            xmin = ymin = xmax = ymax = 0
        if len(parts) != 5 or xmax < xmin or ymax < ymin or xmin < 1 or ymin < 1:
            raise ManifestError(
                f"Expected '<id> <xmin> <ymin> <xmax> <ymax>' (1-based pixels, min <= max) on "
                f"line {number} of {file}. Got {line!r} instead."
            )
        boxes[parts[0]] = (xmin - 1, ymin - 1, xmax, ymax)
    return boxes


def _without_banner(folder: str, image_id: str) -> tuple[int, int, int, int]:
    """The box of ``images/<image_id>.jpg`` above its bottom banner."""
    from PIL import Image

    path = os.path.join(folder, "images", f"{image_id}.jpg")
    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
    except (OSError, ValueError) as err:
        raise ManifestError(
            f"Expected a readable JPEG {path} for --crop banner (its size sets the crop; or "
            f"--crop whole). Got {err}."
        ) from None
    return 0, 0, width, height - BANNER_HEIGHT


def load(root: str, options: DataOptions) -> Dataset:
    """Read the FGVC-Aircraft layout under ``root`` (rules in the module doc)."""
    options.check("FGVC-Aircraft", ("crop", "level"), root)
    level, crop = options.level or "variant", options.crop or "whole"
    folder = _data_folder(root)
    assert folder is not None  # detect() said so
    lists = {s: os.path.join(folder, f"images_{level}_{s}.txt") for s in _SPLITS}
    lists = {s: f for s, f in lists.items() if os.path.isfile(f)}
    trainval = os.path.join(folder, f"images_{level}_trainval.txt")
    if not {"train", "val"} <= lists.keys() and os.path.isfile(trainval):
        lists = {"trainval": trainval, **{s: f for s, f in lists.items() if s == "test"}}
    if not lists:
        raise ManifestError(
            f"Expected images_{level}_<split>.txt (split train, val, test or trainval) in "
            f"{folder} for --level {level}. Got none instead."
        )
    names_file = os.path.join(folder, f"{AIRCRAFT_LEVELS[level]}.txt")
    declared = [line for _, line in _lines(names_file)] if os.path.isfile(names_file) else None
    resolve = resolver(root)
    entries, seen = [], {}  # (id, name, split)
    for split, file in lists.items():
        for number, line in _lines(file):
            image_id, _, name = line.partition(" ")
            where = f"line {number} of {file}"
            if not name.strip() or "/" in image_id or image_id in (".", ".."):
                raise ManifestError(
                    f"Expected '<image id> <{level} name>' on {where}. Got {line!r} instead."
                )
            if declared is not None and name.strip() not in declared:
                raise ManifestError(
                    f"Expected a {level} listed in {names_file} on {where}. Got "
                    f"{name.strip()!r} instead."
                )
            if image_id in seen:
                raise ManifestError(
                    f"Expected each image id once over the {level} lists. Got {image_id!r} on "
                    f"{seen[image_id]} and again on {where}."
                )
            seen[image_id] = where
            entries.append((image_id, name.strip(), split))
    classes = tuple(declared if declared is not None else sorted({n for _, n, _ in entries}))
    index = {name: label for label, name in enumerate(classes)}
    boxes = _boxes(os.path.join(folder, "images_box.txt")) if crop == "box" else {}
    if crop == "banner":
        boxes = {image_id: _without_banner(folder, image_id) for image_id, _, _ in entries}
    expected = f"FGVC-Aircraft images that resolve inside the data root {root}"
    records = []
    for image_id, name, split in entries:
        path = os.path.join(folder, "images", f"{image_id}.jpg")
        resolve(path, expected, path)
        if crop == "box" and image_id not in boxes:
            raise ManifestError(
                f"Expected a box for image {image_id} in images_box.txt of {folder} for "
                "--crop box. Got none instead."
            )
        rid = relative_id(root, path)
        records.append(
            Record(rid, absolute_path(root, rid), index[name], split, None, box=boxes.get(image_id))
        )
    records.sort(key=lambda r: r.id)
    selection = {"level": level, "crop": crop}
    return Dataset(root, root, classes, tuple(records), selection=selection, format="fgvc-aircraft")


READER = Reader("fgvc-aircraft", "folder", detect, load)
