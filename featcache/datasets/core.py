"""What every dataset reader shares: the record and dataset types, the reader options, the
errors, the reader-table row (``Reader``) and the path-safety helpers.

Rules (each tested in tests/test_data.py; ``MaskLabels`` in tests/test_ade20k.py):
  - The data root holds on resolved paths: symlinks are followed (image and mask files, and in a
    folder also split, class and nested folders, each folder walked once per class), and a path
    that resolves outside the root is an error (tested in tests/test_redteam_data.py).
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
  - A record's content identity (``Record.load``): the bytes actually decoded (the file, or a
    container's member: a tar member, a parquet cell; then the mask file, when there is one) are
    read once, hashed as they are read (``content_digest``: blake2b, 16 bytes) and decoded from
    memory: the row digest is ``content_digest(image bytes)``, or, with a mask,
    ``content_digest(content_digest(image bytes) + content_digest(mask bytes))``; an unreadable
    image's row has ``NO_DIGEST`` (16 zero bytes). ``Record.stamp`` is the cheap change check:
    (size, mtime_ns) of the file read (the container of a member; then the mask), taken before
    it is read; (-1, -1) for a missing file, None for a remote (URL) container.
  - Every path a dataset names (manifest rows, LLaVA ``image``, iNat ``file_name``, parquet
    path strings) is relative to the data root (or ``--image-root``) and must resolve inside it
    (``relative_path``): absolute paths, ``..`` and symlinks that lead out are refused.
  - Hostile annotation files are one-line ``ManifestError``s naming the file, never tracebacks:
    text that is not UTF-8 (``read_text`` names the line and its bytes) and JSON that is invalid
    or nested deeper than the parser can follow (``parse_json``, ``read_json``; tested in
    tests/test_trust_datasets.py).
  - ``DataOptions`` carries the reader options (crop, select, level, ...) and the
    class-balanced subset (featcache/datasets/subsets.py) that ``load_dataset`` applies last. An
    option that does not apply to the layout read is a ``ManifestError``.
Every record's ``id`` is its normalised path relative to the data root, with ``/`` separators,
so ``manifest_hash`` does not change when the dataset folder moves.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from featcache.errors import BadImageError, FeatcacheError
from featcache.jsontext import parse_json

__all__ = [
    "ACCEPTED_DATA",
    "DIGEST_SIZE",
    "IMAGE_EXTENSIONS",
    "MASK_IGNORE",
    "NO_DIGEST",
    "SPLIT_NAMES",
    "TEST_SPLIT_WAYS",
    "DataOptions",
    "Dataset",
    "Loaded",
    "ManifestError",
    "Member",
    "MaskLabelError",
    "MaskLabels",
    "Reader",
    "Record",
    "Resolve",
    "absolute_path",
    "content_digest",
    "file_stamp",
    "images_under",
    "parse_json",
    "read_file",
    "read_json",
    "read_text",
    "relative_id",
    "relative_path",
    "resolver",
    "visible_dirs",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})

_DRIVE = re.compile(r"[A-Za-z]:")  # a Windows drive (UNC paths start with a separator)
# an ignored mask pixel: stitchtrain.model.losses.IGNORE_INDEX and the store's fill
MASK_IGNORE = -1
_MASK_LIMIT = int(np.iinfo(np.int16).max) + 1  # stores keep masks as int16

# what the errors about a missing test split (extract --split test, fit) say to do
TEST_SPLIT_WAYS = (
    "--test-fraction F (hold out a seeded fraction F of each class of a plain class folder), "
    "--per-class train=N,test=M (draw both splits from train), or a folder with train/ and "
    "test/ subfolders of class folders"
)

ACCEPTED_DATA = (
    "a directory of class folders (or a dataset layout), a .csv or .jsonl manifest, a "
    "LLaVA-style .json, parquet files or webdataset .tar shards"
)
Resolve = Callable[[str, str, str], str]  # (path, expected, got) -> resolved path; see resolver
DIGEST_SIZE = 16  # bytes of a row digest (featcache.store.DIGEST_BYTES, the digests row width)
NO_DIGEST = bytes(DIGEST_SIZE)  # the digest of a row whose image could not be read


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

    def load(
        self,
        decoder: Callable[..., Any] | None = None,
        mask_decoder: Callable[..., Any] | None = None,
    ) -> Loaded:
        """``decode``, reading the bytes once and hashing them as read: the image (cropped to
        ``box``), its mask (``mask_decoder(bytes, name=mask path)``, when the record has one and
        a mask decoder is given) and the row digest of every byte decoded (the module rules).
        ``BadImageError`` as ``decode``; for the mask, its reason is "mask <path>: why"."""
        from featcache.images import crop_box, decode_image

        data = read_file(self.path, self.id) if self.member is None else self.member.read()
        digest = content_digest(data)
        image = (decoder or decode_image)(data, name=self.id)
        image = image if self.box is None else crop_box(image, self.box, name=self.id)
        mask = None
        if self.mask is not None and mask_decoder is not None:
            try:
                mask_data = read_file(self.mask, self.mask)
                mask = mask_decoder(mask_data, name=self.mask)
            except BadImageError as err:  # the image is unreadable for its mask
                raise BadImageError(self.id, f"mask {err}") from err
            digest = content_digest(digest + content_digest(mask_data))
        return Loaded(image, mask, digest)

    def stamp(self) -> list[int] | None:
        """[size, mtime_ns] of the file read (a member's container), then of the mask when
        there is one; [-1, -1] for a missing file; None for a remote (URL) container."""
        if "://" in self.path:
            return None
        return [*file_stamp(self.path), *([] if self.mask is None else file_stamp(self.mask))]


@dataclass(frozen=True, slots=True)
class Loaded:
    """What ``Record.load`` read: the image, its raw mask (or None) and the row digest."""

    image: Any
    mask: Any
    digest: bytes


def content_digest(data: bytes) -> bytes:
    """The 16-byte blake2b digest of ``data``: the content identity of the bytes decoded."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def read_file(path: str, name: str) -> bytes:
    """Every byte of the local file ``path`` (one read); ``BadImageError`` naming ``name`` when
    it is missing or cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise BadImageError(name, "file not found") from None
    except OSError as err:
        raise BadImageError(name, f"cannot read: {err}") from err


def file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of ``path`` (symlinks followed); (-1, -1) when it does not exist."""
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


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
            ways = f" For a test split: {TEST_SPLIT_WAYS}." if name == "test" else ""
            raise ManifestError(
                f"Expected a split of {self.source}: one of {present}. Got {name!r} instead.{ways}"
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
            [r.id, r.label, None if r.mask is None else relative_id(self.root, r.mask)]
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
            (``featcache.datasets.subsets``): "N" or "SPLIT=N,SPLIT=N", drawn from the splits
            named by subset_from (default "train"), seeded; "error" or "drop" for classes too
            small.
        test_fraction: class folders: hold out this fraction (0 < F < 1) of each class of the
            train split as split "test" (``featcache.datasets.holdout``), seeded by
            subset_seed.
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
    test_fraction: float | None = None

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
        fraction = self.test_fraction
        number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
        if fraction is not None and not (number and 0 < fraction < 1):
            raise ManifestError(
                f"Expected --test-fraction between 0 and 1 (exclusive), e.g. 0.2. "
                f"Got {fraction!r} instead."
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
    "test_fraction": ("--test-fraction", "a folder of class folders without a test split"),
}


@dataclass(frozen=True)
class Reader:
    """One row of the reader table (``featcache.datasets.loading.READERS``): how a reader
    detects the ``--data`` it reads, and how it reads it. ``load_dataset`` asks the rows in
    table order and reads with the first whose ``detect`` says yes.

    Attributes:
        format: the ``Dataset.format`` it reads.
        scope: what ``detect`` is asked: "path" (``detect(path)``, the value as given, before
            it is resolved: patterns and URLs too), "folder" (``detect(root, top)``, for an
            existing folder: its absolute path and its visible subfolders, ``visible_dirs``) or
            "file" (``detect(file)``, the absolute path of anything that is not a folder).
        detect: see ``scope``.
        load: ``load(path, options)``, the path being the one ``detect`` saw; also
            ``reduce_zero_label=`` when ``mask_labels``.
        mask_labels: whether ``load`` takes ``reduce_zero_label`` (None: the layout's default)
            and sets ``Dataset.mask_labels`` from it.
    """

    format: str
    scope: Literal["path", "folder", "file"]
    detect: Callable[..., bool]
    load: Callable[..., Dataset]
    mask_labels: bool = False

    def __post_init__(self) -> None:
        if self.scope not in ("path", "folder", "file"):
            raise ValueError(f"Expected scope path, folder or file. Got {self.scope!r}.")


def relative_id(root: str, path: str) -> str:
    """``path`` relative to ``root``, posix separators: a record id."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def absolute_path(root: str, rid: str) -> str:
    """The path under ``root`` of the record id ``rid`` (the inverse of ``relative_id``)."""
    return os.path.join(root, *rid.split("/"))


def visible_dirs(folder: str) -> list[str]:
    """The sorted names of the subfolders of ``folder``, hidden ones left out."""
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_dir() and not entry.name.startswith(".")
    )


def resolver(root: str) -> Resolve:
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


def images_under(root: str, folder: str, resolve: Resolve) -> list[str]:
    """The ids of the image files (``IMAGE_EXTENSIONS``, any case) under ``root/folder``,
    recursively, hidden entries left out, each folder walked once; every folder and file must
    ``resolve`` inside ``root``."""
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
                found.append(relative_id(root, path))
    return found


def relative_path(value: Any, column: str, where: str, root: str, resolve: Resolve) -> str:
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
        resolve(absolute_path(root, posix), expected, repr(text))
        return posix
    raise ManifestError(
        f"Expected a {column} relative to the data root {root} on {where}. Got {got} instead."
    )


def read_text(file: str) -> str:
    """The text of ``file`` (UTF-8, a leading byte-order mark dropped), or a ``ManifestError``
    naming it: unreadable, or not UTF-8 (then the line number and that line's bytes)."""
    try:
        with open(file, encoding="utf-8-sig") as handle:
            return handle.read()
    except UnicodeDecodeError:
        pass  # located below, from the bytes
    except OSError as err:
        raise ManifestError(f"Expected a readable file {file}. Got {err}.") from None
    with open(file, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raw, at = err.object, err.start
        start, end = raw.rfind(b"\n", 0, at) + 1, raw.find(b"\n", at)
        line = bytes(raw[start : len(raw) if end < 0 else end])
        shown = repr(line[:200]) + (" ..." if len(line) > 200 else "")
        number = raw.count(b"\n", 0, at) + 1
        raise ManifestError(
            f"Expected UTF-8 text in {file}. Got {shown} on line {number} ({err.reason}: byte "
            f"{raw[at : at + 1]!r}) instead."
        ) from None


def read_json(file: str, expected: str) -> Any:
    """The JSON value in ``file``, or a ``ManifestError`` ``Expected {expected}. Got ...``
    naming the file and why (unreadable, not UTF-8, invalid, nested too deep)."""
    text = read_text(file)
    try:
        return parse_json(text)
    except ValueError as err:
        raise ManifestError(f"Expected {expected}. Got {err} in {file} instead.") from None
