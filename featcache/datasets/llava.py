"""LLaVA-1.5-style JSON: a list of records with an ``image`` path, no labels (Table 4's
task-agnostic FFM data: ``blip_laion_cc_sbu_558k.json``, ``llava_v1_5_mix665k.json``).

Rules (tested in tests/test_corpora.py):
  - ``--data FILE.json`` holding a JSON list of objects; ``image`` is a path relative to the
    image root (``--image-root DIR``, default the JSON's folder), which every path must
    resolve inside (symlinks followed), else a ``ManifestError`` names the record's index.
    A file that is not UTF-8 or not JSON (nested too deep included) is a ``ManifestError``
    naming it.
  - Records without ``image`` (LLaVA's text-only conversations) are not images and are left
    out; an image named by several records (one image, several conversations) is one record.
    Other keys (``id``, ``conversations``, ...) are ignored.
  - One split, "train"; labels -1, no classes. Ids are the paths relative to the image root,
    so the manifest hash does not depend on where the JSON or the images live.
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
    read_json,
    relative_path,
    resolver,
)

__all__ = ["READER", "detect", "load"]


def detect(file: str) -> bool:
    """A ``.json`` file (any case): a LLaVA-style list (a folder is never one)."""
    return file.lower().endswith(".json")


def load(file: str, options: DataOptions) -> Dataset:
    """Read a LLaVA-style JSON list (rules in the module doc)."""
    options.check("a LLaVA-style JSON list", ("image_root",), file)
    if not os.path.isfile(file):
        raise ManifestError(
            f"Expected a LLaVA-style JSON list of records with an 'image' path as --data. Got "
            f"{file}, which does not exist, instead."
        )
    root = os.path.abspath(options.image_root or os.path.dirname(file))
    if not os.path.isdir(root):
        raise ManifestError(f"Expected --image-root to be a folder. Got {root} instead.")
    entries = read_json(file, "a readable JSON list of records with an 'image' path")
    if not isinstance(entries, list):
        raise ManifestError(
            f"Expected a JSON list of records with an 'image' path in {file}. Got a "
            f"{type(entries).__name__} instead."
        )
    resolve = resolver(root)
    ids: dict[str, None] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ManifestError(
                f"Expected JSON objects in the list of {file}. Got {entry!r} at index {index}."
            )
        if entry.get("image") is None:
            continue
        where = f"record {index} of {file}"
        ids.setdefault(relative_path(entry["image"], "image", where, root, resolve))
    if not ids:
        raise ManifestError(f"Expected records with an 'image' path in {file}. Got none.")
    records = tuple(Record(rid, absolute_path(root, rid), -1, "train", None) for rid in sorted(ids))
    return Dataset(file, root, (), records, format="llava-json")


READER = Reader("llava-json", "file", detect, load)
