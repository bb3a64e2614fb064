"""Image datasets: a folder of class subfolders, the ADE20K layout, or a CSV / JSONL manifest.

Rules (each tested in tests/test_data.py; the ADE20K layout and ``MaskLabels`` in
tests/test_ade20k.py):
  - A folder holds one subfolder per class; labels follow the sorted subfolder names, and images
    (``IMAGE_EXTENSIONS``, any case) are found recursively in each. If every top-level subfolder is
    a split name (``SPLIT_NAMES``), each is a split of class subfolders and the class list is the
    sorted union over splits. Otherwise all images are split "train". Hidden entries are ignored.
  - A manifest (``.csv`` with a header row, or ``.jsonl`` with one object a line) needs a ``path``
    column; ``label``, ``split`` (default "train") and ``mask`` are optional, others ignored.
    Paths are relative to the manifest's folder and may not leave it; they need not exist yet
    (the extractor reports missing files at decode time).
  - The data root holds on resolved paths: symlinks are followed (image and mask files, and in a
    folder also split, class and nested folders, each folder walked once per class), and a path
    that resolves outside the root is an error (tested in tests/test_redteam_data.py).
  - Labels are either all integers >= 0 (class indices, classes "0".."max") or all class names
    (indexed by sorted name). Without a label column every label is -1 and there are no classes.
    Integer labels must stay below min(100000, max(1000, 10 x rows)): every index up to the
    largest becomes a class, so a stray huge index would make millions of empty classes
    (tested in tests/test_redteam_data.py).
  - A split has a mask on every row or on none.
  - The ADE20K layout (ADEChallengeData2016): a folder whose subfolders include ``images`` and
    ``annotations``, with ``training`` and/or ``validation`` under either. Splits "train"
    (training) and "val" (validation); every image (``IMAGE_EXTENSIONS``, any case, found
    recursively) has the ``.png`` annotation of the same relative path and stem, and every
    ``.png`` annotation its image, else a ``ManifestError`` names the file. Labels are -1 and
    the classes are ``featcache.ade20k.ADE20K_CLASSES``. Everything else (objectInfo150.txt,
    sceneCategories.txt, other folders, also beside training / validation) is ignored.
  - ``Dataset.mask_labels`` (``MaskLabels``) says how raw mask values become training labels:
    ``reduce_zero_label`` (0 -> ignored, k -> k - 1) is on by default for ADE20K (150 classes;
    off: 151 classes, "other" first) and off for manifests and class folders;
    ``load_dataset(path, reduce_zero_label=...)`` overrides it. The raw value 255 is ignored.
    Ignored pixels become ``MASK_IGNORE`` (-1: stitchtrain's ``IGNORE_INDEX``, the store's
    int16 fill); any other value outside the classes (``num_classes`` after reduction; when not
    declared, as for manifests, 0..32767: what an int16 store holds) is a ``MaskLabelError``,
    never a new class.
    ``mask_labels`` enters ``manifest_hash`` of splits with masks (hashes of splits without
    masks are those of the original formula).
  - fMoW-RGB, iNaturalist 2021 and FGVC-Aircraft folders are detected before ADE20K and
    class folders and read by featcache/fmow.py, inat.py and aircraft.py (their rules are in
    those modules); ``DataOptions`` carries their options (crop, select, level) and the
    class-balanced subset (featcache/subsets.py) that ``load_dataset`` applies last. An option
    that does not apply to the layout read is a ``ManifestError``.
  - Corpus formats, each with its rules in its module: webdataset ``.tar`` shards (a path,
    brace pattern or glob, local or fsspec URL: featcache/wds.py), Hugging Face parquet (a
    ``.parquet`` file or glob, or a folder holding parquet files: featcache/hf_parquet.py) and
    a LLaVA-style ``.json`` list of image paths (featcache/llava.py). Their records read the
    image's bytes through ``Record.member``.
Every record's ``id`` is its normalised path relative to the data root, with ``/`` separators,
so ``manifest_hash`` does not change when the dataset folder moves.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from featcache.datasets.ade20k import (
    ADE20K_CLASSES,
    ADE20K_IGNORE_VALUE,
    ADE20K_OTHER,
    ADE20K_SPLITS,
)
from featcache.errors import FeatcacheError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_IGNORE",
    "SPLIT_NAMES",
    "DataOptions",
    "Dataset",
    "ManifestError",
    "Member",
    "MaskLabelError",
    "MaskLabels",
    "Record",
    "load_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})

_INTEGER = re.compile(r"[+-]?\d+")
_DRIVE = re.compile(r"[A-Za-z]:")  # a Windows drive (UNC paths start with a separator)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_ACCEPTED_LABELS = "labels that are all integers >= 0 (class indices) or all class names"
_MAX_CLASSES = 100_000
# an ignored mask pixel: stitchtrain.model.losses.IGNORE_INDEX and the store's fill
MASK_IGNORE = -1
_MASK_LIMIT = int(np.iinfo(np.int16).max) + 1  # stores keep masks as int16

ACCEPTED_DATA = (
    "a directory of class folders (or a dataset layout), a .csv or .jsonl manifest, a "
    "LLaVA-style .json, parquet files or webdataset .tar shards"
)
_Resolve = Callable[[str, str, str], str]  # (path, expected, got) -> resolved path; see _resolver


class ManifestError(FeatcacheError, ValueError):
    """A dataset folder or manifest that cannot be read; the message names file, row and value."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MaskLabelError(FeatcacheError, ValueError):
    """A label map that ``MaskLabels.apply`` cannot map: not (H, W), not integer, or holding
    values outside the classes; the message lists the values and how many pixels hold them."""


@dataclass(frozen=True)
class MaskLabels:
    """How the raw values of a decoded label map become training labels.

    Attributes:
        reduce_zero_label: mmsegmentation's convention: raw 0 ("other") is ignored and raw k is
            label k - 1 (ADE20K's 1..150 -> 0..149).
        ignore_value: the raw value meaning "no label" (255, mmsegmentation's ignore_index), or
            None when every value is a label.
        num_classes: labels (after reduction) must be below it; None: the classes are not
            declared and labels must fit the store's int16 (below 32768).
    """

    reduce_zero_label: bool = False
    ignore_value: int | None = 255
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reduce_zero_label, bool):
            raise ValueError(
                f"Expected reduce_zero_label True or False. Got {self.reduce_zero_label!r}."
            )
        if self.ignore_value is not None and not _is_int(self.ignore_value):
            raise ValueError(
                f"Expected an integer ignore_value or None. Got {self.ignore_value!r}."
            )
        if self.num_classes is not None and not (
            _is_int(self.num_classes) and 1 <= self.num_classes <= _MASK_LIMIT
        ):
            raise ValueError(
                f"Expected num_classes in 1..{_MASK_LIMIT} or None. Got {self.num_classes!r}."
            )

    def apply(self, mask: Any) -> np.ndarray:
        """Raw label map (PIL image or array, (H, W) integers) -> int64 (H, W) training labels,
        ``MASK_IGNORE`` (-1) where ignored; other values outside the classes raise
        ``MaskLabelError``. Pointwise, so it commutes with nearest-neighbour resizing."""
        values = np.asarray(mask)
        if values.ndim != 2:
            raise MaskLabelError(
                f"Expected a single-channel (H, W) label map. Got shape {values.shape} instead."
            )
        if values.dtype.kind not in "biu":
            raise MaskLabelError(
                f"Expected integer label values. Got dtype {values.dtype} instead."
            )
        raw = values.astype(np.int64)
        ignored = (
            raw == self.ignore_value
            if self.ignore_value is not None
            else np.zeros(raw.shape, dtype=bool)
        )
        if self.reduce_zero_label:
            ignored |= raw == 0
            labels = raw - 1
        else:
            labels = raw
        limit = _MASK_LIMIT if self.num_classes is None else self.num_classes
        bad = ~ignored & ((labels < 0) | (labels >= limit))
        if bad.any():
            found = np.unique(raw[bad])
            listed = ", ".join(str(v) for v in found[:10]) + (" ..." if len(found) > 10 else "")
            raise MaskLabelError(
                f"Expected raw mask values {self._accepted(limit)}. Got values {listed} on "
                f"{int(bad.sum())} pixel(s) instead."
            )
        labels[ignored] = MASK_IGNORE
        return labels

    def _accepted(self, limit: int) -> str:
        if self.reduce_zero_label:
            text = f"1..{limit} (labels 0..{limit - 1})"
        else:
            text = f"0..{limit - 1}"
        ignored = ["0"] if self.reduce_zero_label else []
        ignored += [] if self.ignore_value is None else [str(self.ignore_value)]
        return text + (f" or {' / '.join(ignored)} (ignored)" if ignored else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (part of ``manifest_hash`` for splits with masks)."""
        return {
            "reduce_zero_label": self.reduce_zero_label,
            "ignore_value": self.ignore_value,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskLabels:
        """The inverse of ``to_dict``; missing keys take the defaults."""
        names = ("reduce_zero_label", "ignore_value", "num_classes")
        return cls(**{name: data[name] for name in names if name in data})


class Member(Protocol):
    """Where an image's encoded bytes are when it is not a file of its own (a tar member, a
    parquet cell): ``read()`` returns them or raises ``BadImageError`` naming why not."""

    def read(self) -> bytes: ...


@dataclass(frozen=True, slots=True)  # slots: a million records in half the memory
class Record:
    """One image: ``id`` is its path relative to the data root (posix), ``path`` is absolute.

    ``box`` (left, top, right, bottom in pixels, PIL's crop convention, clipped to the image)
    crops the decoded image, as fMoW's object boxes do; ``member`` reads the image's bytes when
    they sit inside a container (``path`` then names the container). ``decode()`` is the one
    way extraction reads an image.
    """

    id: str
    path: str
    label: int
    split: str
    mask: str | None
    box: tuple[int, int, int, int] | None = None
    member: Member | None = None

    def decode(self, decoder: Callable[..., Any] | None = None) -> Any:
        """The upright RGB ``PIL.Image``, cropped to ``box``; ``BadImageError`` when it cannot
        be read or the box misses the image. ``decoder(path or bytes, name=id)`` decodes
        (default ``featcache.images.decode_image``; extraction passes its own reference)."""
        from featcache.images import crop_box, decode_image

        source = self.path if self.member is None else self.member.read()
        image = (decoder or decode_image)(source, name=self.id)
        return image if self.box is None else crop_box(image, self.box, name=self.id)


@dataclass(frozen=True)
class Dataset:
    """Every record of a dataset, sorted by id, with the class names in label order, and how
    its masks' raw values become labels (``mask_labels``)."""

    source: str
    root: str
    classes: tuple[str, ...]
    records: tuple[Record, ...]
    mask_labels: MaskLabels = MaskLabels()
    # what the reader and subset options chose that the rows do not show (fMoW's crop, a
    # class-balanced subset's sizes and seed); JSON-ready, part of manifest_hash when non-empty
    selection: dict[str, Any] = field(default_factory=dict)
    format: str = "folder"  # the layout read: folder, ade20k, manifest, fmow, inat2021, ...

    def splits(self) -> list[str]:
        """The split names present, sorted."""
        return sorted({record.split for record in self.records})

    def split(self, name: str) -> list[Record]:
        """The records of split ``name`` sorted by id; an unknown split is a ``ManifestError``."""
        chosen = [record for record in self.records if record.split == name]
        if not chosen:
            present = ", ".join(repr(s) for s in self.splits())
            raise ManifestError(
                f"Expected a split of {self.source}: one of {present}. Got {name!r} instead."
            )
        return chosen

    def ordered(self, name: str, seed: int = 0) -> list[Record]:
        """The split permuted by ``np.random.default_rng(seed)``: same order on every machine."""
        records = self.split(name)
        return [records[i] for i in np.random.default_rng(seed).permutation(len(records))]

    def manifest_hash(self, name: str) -> str:
        """32 hex chars of sha256 over classes, (id, label, mask id[, box]) rows, for a split
        with masks ``mask_labels``, and ``selection`` when non-empty; path-independent (the
        box enters a row only when it has one, the rest only when present, so hashes of
        datasets without them are those of the original formula)."""
        rows = [
            [r.id, r.label, None if r.mask is None else _relative_id(self.root, r.mask)]
            + ([] if r.box is None else [list(r.box)])
            for r in self.split(name)
        ]
        content: dict[str, Any] = {"classes": list(self.classes), "records": rows}
        if self.has_masks(name):
            content["mask_labels"] = self.mask_labels.to_dict()
        if self.selection:
            content["selection"] = self.selection
        text = json.dumps(content, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def has_masks(self, name: str) -> bool:
        """Whether split ``name`` has a mask per record (a split has all masks or none)."""
        return all(record.mask is not None for record in self.split(name))


@dataclass(frozen=True)
class DataOptions:
    """How to read a dataset beyond its path: the options of ``featcache extract`` and
    ``featcache dataset describe`` (each named by its CLI flag in errors). A reader refuses an
    option that does not apply to its layout (``check``); None means the layout's default.

    Attributes:
        crop: fMoW-RGB and FGVC-Aircraft: "box" (crop to the annotated box) or "whole";
            Aircraft also "banner" (all but its 20-pixel copyright banner). Default: fMoW box
            (the usual fMoW practice), Aircraft whole.
        select: iNaturalist 2021: (taxonomy field, values): keep the categories whose field
            is one of the values, e.g. ("family", ("Nymphalidae", "Pieridae")).
        level: FGVC-Aircraft: the class level, "variant" (default), "family" or
            "manufacturer".
        image_root: LLaVA-style JSON: the folder its ``image`` paths are relative to (default:
            the JSON's folder).
        image_column, label_column: Hugging Face parquet: the columns holding the image
            ({bytes, path}) and the label (default: from the dataset's features metadata).
        per_class, subset_from, subset_seed, short_classes: a class-balanced subset
            (``featcache.subsets``): "N" or "SPLIT=N,SPLIT=N", drawn from the splits named by
            subset_from (default "train"), seeded; "error" or "drop" for classes too small.
    """

    crop: str | None = None
    select: tuple[str, tuple[str, ...]] | None = None
    level: str | None = None
    image_root: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    per_class: str | None = None
    subset_from: str | None = None
    subset_seed: int = 0
    short_classes: str = "error"

    def __post_init__(self) -> None:
        for name, accepted in (
            ("crop", ("box", "whole", "banner")),
            ("level", ("variant", "family", "manufacturer")),
            ("short_classes", ("error", "drop")),
        ):
            value = getattr(self, name)
            if value is not None and value not in accepted:
                flag = "--" + name.replace("_", "-")
                raise ManifestError(
                    f"Expected {flag} {' or '.join(accepted)}. Got {value!r} instead."
                )

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the defaults, JSON-ready (a store's ``dataset.options``:
        what reopening its dataset needs, ``reopen_dataset``); {} for the defaults."""
        defaults = DataOptions()
        chosen = {k: v for k, v in vars(self).items() if v != getattr(defaults, k)}
        if "select" in chosen:
            chosen["select"] = [chosen["select"][0], list(chosen["select"][1])]
        return chosen

    @classmethod
    def from_dict(cls, recorded: dict[str, Any]) -> DataOptions:
        """Inverse of ``to_dict``."""
        recorded = dict(recorded)
        if recorded.get("select") is not None:
            field_name, values = recorded["select"]
            recorded["select"] = (field_name, tuple(values))
        return cls(**recorded)

    def check(self, layout: str, allowed: tuple[str, ...], source: str) -> None:
        """Refuse reader options outside ``allowed`` for this ``layout``."""
        for name, (flag, layouts) in _READER_OPTIONS.items():
            if getattr(self, name) is not None and name not in allowed:
                raise ManifestError(
                    f"Expected {flag} only with data it applies to ({layouts}). "
                    f"Got {flag} with {source}, read as {layout}, instead."
                )


# DataOptions field -> (CLI flag, the layouts it applies to)
_READER_OPTIONS = {
    "crop": ("--crop", "fMoW-RGB, FGVC-Aircraft"),
    "select": ("--select", "iNaturalist 2021"),
    "level": ("--level", "FGVC-Aircraft"),
    "image_root": ("--image-root", "LLaVA-style JSON"),
    "image_column": ("--image-column", "Hugging Face parquet"),
    "label_column": ("--label-column", "Hugging Face parquet"),
}


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
    from featcache.datasets.subsets import class_balanced

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
    from featcache.datasets import hf_parquet, llava, wds

    if reduce_zero_label is not None and not isinstance(reduce_zero_label, bool):
        raise ManifestError(
            f"Expected reduce_zero_label True, False or None. Got {reduce_zero_label!r} instead."
        )
    if wds.detect(path):
        return wds.load(path, options)
    if hf_parquet.detect(path):
        return hf_parquet.load(path, options)
    source = os.path.abspath(path)
    if os.path.isdir(source):
        return _load_folder(source, reduce_zero_label, options)
    if source.lower().endswith(".json"):
        return llava.load(source, options)
    options.check("a manifest", (), source)
    suffix = os.path.splitext(source)[1].lower()
    accepted = ACCEPTED_DATA
    if suffix not in (".csv", ".jsonl"):
        raise ManifestError(f"Expected {accepted} as --data. Got {source} instead.")
    if not os.path.isfile(source):
        raise ManifestError(
            f"Expected {accepted} as --data. Got {source}, which does not exist, instead."
        )
    rows = _read_csv(source) if suffix == ".csv" else _read_jsonl(source)
    return _load_rows(source, rows, MaskLabels(reduce_zero_label=bool(reduce_zero_label)))


def _relative_id(root: str, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _absolute(root: str, rid: str) -> str:
    return os.path.join(root, *rid.split("/"))


def _visible_dirs(folder: str) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_dir() and not entry.name.startswith(".")
    )


def _resolver(root: str) -> _Resolve:
    """``resolve(path, expected, got)``: where ``path`` resolves, symlinks followed, or a
    ``ManifestError`` when that is outside ``root`` (folder resolutions are cached)."""
    real_root = os.path.realpath(root)
    prefix = os.path.join(real_root, "")  # with a trailing separator
    folder = functools.lru_cache(maxsize=None)(os.path.realpath)

    def resolve(path: str, expected: str, got: str) -> str:
        head, name = os.path.split(path)
        real = os.path.realpath(path) if os.path.islink(path) else os.path.join(folder(head), name)
        if real != real_root and not real.startswith(prefix):
            raise ManifestError(
                f"Expected {expected} (symlinks within it are followed). "
                f"Got {got}, which resolves to {real}, instead."
            )
        return real

    return resolve


def _images_under(root: str, folder: str, resolve: _Resolve) -> list[str]:
    expected = f"folders and image files that resolve inside the data root {root}"
    found, walked = [], set()
    for current, dirs, files in os.walk(os.path.join(root, folder), followlinks=True):
        real = resolve(current, expected, current)
        if real in walked:  # a folder linked twice, or a loop
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(current, name)
                resolve(path, expected, path)
                found.append(_relative_id(root, path))
    return found


def _load_folder(root: str, reduce_zero_label: bool | None, options: DataOptions) -> Dataset:
    from featcache.datasets import aircraft, fmow, inat

    top = _visible_dirs(root)
    for layout in (fmow, inat, aircraft):
        if layout.detect(root, top):
            return layout.load(root, options)
    if _is_ade20k(root, top):
        options.check("the ADE20K layout", (), root)
        return _load_ade20k(root, True if reduce_zero_label is None else reduce_zero_label)
    options.check("a class-folder tree", (), root)
    if top and all(name in SPLIT_NAMES for name in top):
        layout = {split: (f"{split}/", _visible_dirs(os.path.join(root, split))) for split in top}
    else:
        layout = {"train": ("", top)}
    classes = tuple(sorted({c for _, names in layout.values() for c in names}))
    index = {name: label for label, name in enumerate(classes)}
    resolve = _resolver(root)
    records = [
        Record(rid, _absolute(root, rid), index[name], split, None)
        for split, (prefix, names) in layout.items()
        for name in names
        for rid in _images_under(root, prefix + name, resolve)
    ]
    if not records:
        raise ManifestError(
            f"Expected image files ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders of "
            f"{root}. Got none instead."
        )
    mask_labels = MaskLabels(reduce_zero_label=bool(reduce_zero_label))
    return Dataset(root, root, classes, tuple(sorted(records, key=lambda r: r.id)), mask_labels)


def _is_ade20k(root: str, top: list[str]) -> bool:
    """``images/`` and ``annotations/`` with a training or validation folder under either."""
    return {"images", "annotations"} <= set(top) and any(
        os.path.isdir(os.path.join(root, kind, folder))
        for kind in ("images", "annotations")
        for folder in ADE20K_SPLITS
    )


def _by_stem(root: str, folder: str, resolve: _Resolve, suffixes: tuple[str, ...]) -> dict:
    """Files under ``root/folder`` ending in ``suffixes``: path below it without extension ->
    id; two files of one stem are a ``ManifestError`` naming both."""
    found: dict[str, str] = {}
    for rid in sorted(_images_under(root, folder, resolve)):
        if not rid.lower().endswith(suffixes):
            continue
        stem = posixpath.splitext(rid[len(folder) + 1 :])[0]
        if stem in found:
            raise ManifestError(
                f"Expected one file per name in {folder} of the ADE20K layout under {root}. "
                f"Got {found[stem]!r} and {rid!r} instead."
            )
        found[stem] = rid
    return found


def _load_ade20k(root: str, reduce_zero_label: bool) -> Dataset:
    resolve = _resolver(root)
    records, problems = [], []
    for folder, split in ADE20K_SPLITS.items():
        images = _by_stem(root, f"images/{folder}", resolve, IMAGE_EXTENSIONS)
        annotations = _by_stem(root, f"annotations/{folder}", resolve, (".png",))
        for stem in sorted(images.keys() | annotations.keys()):
            image, annotation = images.get(stem), annotations.get(stem)
            if annotation is None:
                problems.append(f"the image {image} without annotations/{folder}/{stem}.png")
            elif image is None:
                problems.append(
                    f"the annotation {annotation} with no image images/{folder}/{stem}.*"
                )
            else:
                records.append(
                    Record(image, _absolute(root, image), -1, split, _absolute(root, annotation))
                )
    if problems:
        more = f" (and {len(problems) - 1} more unpaired files)" if len(problems) > 1 else ""
        raise ManifestError(
            f"Expected each image under images/ of the ADE20K layout under {root} to have its "
            f".png annotation of the same name under annotations/, and each annotation its "
            f"image. Got {problems[0]}{more} instead."
        )
    if not records:
        folders = " or ".join(f"images/{folder}" for folder in ADE20K_SPLITS)
        raise ManifestError(
            f"Expected image files ({', '.join(IMAGE_EXTENSIONS)}) in {folders} of the ADE20K "
            f"layout under {root}. Got none instead."
        )
    classes = ADE20K_CLASSES if reduce_zero_label else (ADE20K_OTHER, *ADE20K_CLASSES)
    mask_labels = MaskLabels(reduce_zero_label, ADE20K_IGNORE_VALUE, len(classes))
    records = tuple(sorted(records, key=lambda r: r.id))
    return Dataset(root, root, classes, records, mask_labels, format="ade20k")


def _read_csv(file: str) -> list[tuple[int, dict[str, Any]]]:
    """Data rows as (line number, column -> value), the header being line 1."""
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        columns = [column.strip() for column in header or []]
        if "path" not in columns:
            raise ManifestError(
                f"Expected a header row with a 'path' column in {file}. "
                f"Got columns {columns} instead."
            )
        return [
            (reader.line_num, dict(zip(columns, (field.strip() for field in fields), strict=False)))
            for fields in reader
            if any(field.strip() for field in fields)
        ]


def _read_jsonl(file: str) -> list[tuple[int, dict[str, Any]]]:
    """Objects as (line number, key -> value); blank lines skipped but counted."""
    rows = []
    with open(file, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row, got = None, f"invalid JSON ({err})"
            else:
                got = f"keys {sorted(row)}" if isinstance(row, dict) else f"{line.strip()!r}"
            if not isinstance(row, dict) or "path" not in row:
                raise ManifestError(
                    f"Expected a JSON object with a 'path' key on line {number} of {file}. "
                    f"Got {got} instead."
                )
            rows.append((number, row))
    return rows


def _relative_path(value: Any, column: str, where: str, root: str, resolve: _Resolve) -> str:
    """The normalised posix path of ``value`` under ``root``, or a ``ManifestError`` (also when
    it resolves, through symlinks, outside ``root``)."""
    text = "" if value is None else str(value).strip()
    posix = posixpath.normpath(text.replace("\\", "/")) if text else ""
    if not text:
        got = "an empty value"
    elif posix.startswith("/") or _DRIVE.match(text):
        got = f"the absolute path {text!r}"
    elif posix in (".", "..") or posix.startswith("../"):
        got = f"{text!r}, which is {'the root itself' if posix == '.' else 'outside it'},"
    else:
        expected = f"a {column} that resolves inside the data root {root} on {where}"
        resolve(_absolute(root, posix), expected, repr(text))
        return posix
    raise ManifestError(
        f"Expected a {column} relative to the data root {root} on {where}. Got {got} instead."
    )


def _label_kind(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return "empty"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return "other"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    text = value.strip()
    return (
        "integer" if _INTEGER.fullmatch(text) else "number" if _NUMBER.fullmatch(text) else "name"
    )


def _labels_if_any(entries: list[tuple[str, Any]]) -> tuple[list[int], tuple[str, ...]]:
    """``_labels`` when any value is not None, else every entry unlabelled (-1, no classes):
    the rule of corpora whose samples may carry no label (webdataset, parquet)."""
    if any(value is not None for _, value in entries):
        return _labels(entries)
    return [-1] * len(entries), ()


def _labels(entries: list[tuple[str, Any]]) -> tuple[list[int], tuple[str, ...]]:
    """Label indices and class names for (where, value) pairs, or a ``ManifestError``."""
    kinds = [_label_kind(value) for _, value in entries]
    count = {"integer": kinds.count("integer"), "name": kinds.count("name")}
    expected = max(count, key=lambda kind: (count[kind], kinds[0] == kind))
    for (where, value), kind in zip(entries, kinds, strict=True):
        if kind == expected and not (kind == "integer" and int(value) < 0):
            continue
        reason = {
            "number": "not a whole number",
            "empty": "empty",
            "other": "neither a number nor a string",
        }.get(kind, "negative" if kind == expected else f"mixed with {count[expected]} {expected}s")
        raise ManifestError(
            f"Expected {_ACCEPTED_LABELS}. Got {value!r} on {where} ({reason}) instead."
        )
    if expected == "integer":
        labels = [int(value) for _, value in entries]
        _check_class_count(entries, labels)
        return labels, tuple(str(i) for i in range(max(labels) + 1))
    names = [value.strip() for _, value in entries]
    classes = tuple(sorted(set(names)))
    index = {name: label for label, name in enumerate(classes)}
    return [index[name] for name in names], classes


def _check_class_count(entries: list[tuple[str, Any]], labels: list[int]) -> None:
    """Refuse integer labels that would make far more classes than the dataset holds."""
    limit = min(_MAX_CLASSES, max(1000, 10 * len(labels)))
    top = max(labels)
    if top < limit:
        return
    where, value = entries[labels.index(top)]
    raise ManifestError(
        f"Expected integer labels (class indices) below {limit}, that is below "
        f"max(1000, 10 x {len(labels)} rows) and below {_MAX_CLASSES}, or class names that are "
        f"not numbers (indexed by sorted name). Got {value!r} on {where}, which would make "
        f"classes 0..{top} for a dataset holding {len(set(labels))} distinct labels, instead."
    )


def _load_rows(
    source: str, rows: list[tuple[int, dict[str, Any]]], mask_labels: MaskLabels
) -> Dataset:
    root = os.path.dirname(source)
    if not rows:
        raise ManifestError(f"Expected at least one data row in {source}. Got none instead.")
    seen: dict[str, int] = {}
    resolve = _resolver(root)
    parsed = []  # (line, id, split, mask id or None, label value); no strings per row kept
    for line, row in rows:
        where = f"line {line} of {source}"
        rid = _relative_path(row.get("path"), "path", where, root, resolve)
        if rid in seen:
            raise ManifestError(
                f"Expected each path once in {source}. Got {rid!r} on line {seen[rid]} "
                f"and again on line {line} instead."
            )
        seen[rid] = line
        mask = row.get("mask")
        mask = None if mask in (None, "") else _relative_path(mask, "mask", where, root, resolve)
        split = "train" if row.get("split") is None else str(row["split"]).strip() or "train"
        parsed.append((line, rid, split, mask, row.get("label")))
    del seen
    if any("label" in row for _, row in rows):
        labels, classes = _labels([(f"line {p[0]} of {source}", p[4]) for p in parsed])
    else:
        labels, classes = [-1] * len(parsed), ()
    for split in sorted({p[2] for p in parsed}):
        # has a mask -> first such row in file order (reversed: the earliest row is kept)
        masked = {p[3] is not None: p[0] for p in reversed(parsed) if p[2] == split}
        if len(masked) == 2:
            raise ManifestError(
                f"Expected a mask on every row of split {split!r} or on none (line "
                f"{masked[True]} of {source} has one). Got no mask on line {masked[False]} of "
                f"{source} instead."
            )
    records = [
        Record(rid, _absolute(root, rid), label, split, mask and _absolute(root, mask))
        for (_, rid, split, mask, _), label in zip(parsed, labels, strict=True)
    ]
    records = tuple(sorted(records, key=lambda r: r.id))
    return Dataset(source, root, classes, records, mask_labels, format="manifest")
