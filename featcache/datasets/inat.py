"""iNaturalist 2021: COCO-style annotation files and selection of categories by taxonomy.

Layout, as iNat 2021 ships it::

    <root>/train.json  <root>/train/<image_dir_name>/<uuid>.jpg
    <root>/val.json    <root>/val/...
    (<root>/train_mini.json  <root>/train_mini/...)

Each ``<split>.json``: ``images`` [{id, file_name (relative to the root), ...}],
``annotations`` [{image_id, category_id, ...}], ``categories`` [{id, name, supercategory,
kingdom, phylum, class, order, family, genus, specific_epithet, ...}].

Rules (tested in tests/test_datasets_paper.py):
  - Detected when the root holds ``train.json``, ``train_mini.json`` or ``val.json`` beside a
    folder of the same name. Each such file is split ``<stem>``.
  - The classes are the categories (the union over splits, one name per id), sorted by id,
    named by ``name``; an image's label is its annotation's category. An image without an
    annotation, an annotation of an unknown image or category, or two annotations of one
    image is a ``ManifestError`` naming the file and id.
  - ``--select FIELD=V1,V2,...`` keeps the categories whose taxonomy FIELD is one of the
    values (the paper: ``family=Sphingidae,Pieridae,Pyralidae``) and the images of those;
    labels index the kept categories by id. An unknown field, or a value no category has, is
    a ``ManifestError`` listing what exists. The selection enters the manifest hash.
  - ``file_name`` must resolve inside the root (``ManifestError`` otherwise).
  - A ``<split>.json`` that is not UTF-8 or not JSON (nested too deep included) is a
    ``ManifestError`` naming it.
"""

from __future__ import annotations

import os
from typing import Any

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

__all__ = ["INAT_SPLITS", "READER", "detect", "load", "parse_select"]

INAT_SPLITS = ("train", "train_mini", "val")


def detect(root: str, top: list[str]) -> bool:
    """A ``<split>.json`` beside a ``<split>/`` folder (the JSON is not read here)."""
    return any(
        split in top and os.path.isfile(os.path.join(root, f"{split}.json"))
        for split in INAT_SPLITS
    )


def parse_select(text: str) -> tuple[str, tuple[str, ...]]:
    """ "family=Nymphalidae,Pieridae" -> ("family", ("Nymphalidae", "Pieridae"))."""
    field, _, values = text.partition("=")
    chosen = tuple(v.strip() for v in values.split(",") if v.strip())
    if not field.strip() or not chosen:
        raise ManifestError(
            "Expected --select FIELD=VALUE,VALUE (a taxonomy field of the categories, e.g. "
            f"family=Sphingidae,Pieridae,Pyralidae). Got {text!r} instead."
        )
    return field.strip(), chosen


def _read(file: str) -> dict[str, Any]:
    data = read_json(file, "a readable COCO-style JSON file")
    lists = {key: data.get(key) if isinstance(data, dict) else None for key in
             ("images", "annotations", "categories")}  # fmt: skip
    bad = [key for key, value in lists.items() if not isinstance(value, list)]
    if bad:
        raise ManifestError(
            f"Expected lists images, annotations and categories in {file}. Got no list "
            f"{', '.join(bad)} instead."
        )
    return lists


def _select(categories: dict[int, dict], select: tuple[str, tuple[str, ...]], where: str) -> set:
    field, values = select
    fields = sorted({key for c in categories.values() for key in c})
    if field not in fields:
        raise ManifestError(
            f"Expected --select FIELD to be a field of the categories in {where} "
            f"({', '.join(fields)}). Got {field!r} instead."
        )
    present = {str(c.get(field)) for c in categories.values()}
    unknown = [v for v in values if v not in present]
    if unknown:
        sample = ", ".join(sorted(present)[:8]) + (" ..." if len(present) > 8 else "")
        raise ManifestError(
            f"Expected --select values that some category's {field} has ({sample}). Got "
            f"{', '.join(repr(v) for v in unknown)} instead."
        )
    return {cid for cid, c in categories.items() if str(c.get(field)) in values}


def load(root: str, options: DataOptions) -> Dataset:
    """Read the iNaturalist 2021 layout under ``root`` (rules in the module doc)."""
    options.check("iNaturalist 2021", ("select",), root)
    files = {s: os.path.join(root, f"{s}.json") for s in INAT_SPLITS}
    files = {s: f for s, f in files.items() if os.path.isfile(f)}
    contents = {split: _read(file) for split, file in files.items()}
    categories: dict[int, dict] = {}
    for split, content in contents.items():
        for category in content["categories"]:
            cid = category.get("id") if isinstance(category, dict) else None
            if not isinstance(cid, int) or not isinstance(category.get("name"), str):
                raise ManifestError(
                    f"Expected categories with an integer id and a name in {files[split]}. "
                    f"Got {category!r} instead."
                )
            if cid in categories and categories[cid]["name"] != category["name"]:
                raise ManifestError(
                    f"Expected one name per category id across {', '.join(files.values())}. "
                    f"Got {categories[cid]['name']!r} and {category['name']!r} for id {cid}."
                )
            categories[cid] = category
    kept = set(categories)
    if options.select is not None:
        kept = _select(categories, options.select, ", ".join(files.values()))
    ordered = sorted(kept)
    label_of = {cid: label for label, cid in enumerate(ordered)}
    resolve = resolver(root)
    records, seen = [], {}
    for split, content in contents.items():
        file = files[split]
        category_of: dict[Any, int] = {}
        for annotation in content["annotations"]:
            image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
            cid = annotation.get("category_id") if isinstance(annotation, dict) else None
            if cid not in categories or image_id in category_of:
                reason = "an unknown category" if cid not in categories else "a second one"
                raise ManifestError(
                    f"Expected one annotation of a known category per image in {file}. Got "
                    f"{reason} ({annotation!r}) instead."
                )
            category_of[image_id] = cid
        for image in content["images"]:
            image_id = image.get("id") if isinstance(image, dict) else None
            if image_id not in category_of:
                raise ManifestError(
                    f"Expected an annotation for every image in {file}. Got none for image "
                    f"{image!r} instead."
                )
            cid = category_of.pop(image_id)
            if cid not in label_of:
                continue
            where = f"image id {image_id} of {file}"
            rid = relative_path(image.get("file_name"), "file_name", where, root, resolve)
            if rid in seen:
                raise ManifestError(
                    f"Expected each file_name once. Got {rid!r} for {seen[rid]} and {where}."
                )
            seen[rid] = where
            records.append(Record(rid, absolute_path(root, rid), label_of[cid], split, None))
        if category_of:
            raise ManifestError(
                f"Expected every annotation in {file} to name an image. Got image_id "
                f"{next(iter(category_of))!r}, which is not in its images, instead."
            )
    if not records:
        raise ManifestError(f"Expected images in {', '.join(files.values())}. Got none instead.")
    classes = tuple(categories[cid]["name"] for cid in ordered)
    selection = {}
    if options.select is not None:
        selection["select"] = {options.select[0]: sorted(options.select[1])}
    records.sort(key=lambda r: r.id)
    return Dataset(root, root, classes, tuple(records), selection=selection, format="inat2021")


READER = Reader("inat2021", "folder", detect, load)
