"""Hugging Face parquet: what ``datasets`` pushes to the hub, read with pyarrow by row group.

Rules (tested in tests/test_corpora.py):
  - ``--data`` is a ``.parquet`` file, a glob of them (``data/train-*.parquet``), or a hub
    dataset folder: parquet files in it, in ``data/`` (``data/<split>-00000-of-00004.parquet``)
    or one level below, or in a split folder of it or of a config folder
    (``<config>/<split>/0000.parquet``, the hub's parquet conversion). Files are taken in
    sorted order.
  - The split of a file is ``<split>`` of the hub's ``<split>-NNNNN-of-NNNNN.parquet`` name,
    else its folder's name when that is a split name, else "train".
  - The image column (``--image-column``; default: the feature of ``_type`` "Image" in the
    file's ``huggingface`` schema metadata, else the first struct column with a ``bytes``
    field) holds ``{bytes, path}`` structs (or plain binary). The label column
    (``--label-column``; default: the ``ClassLabel`` feature, else a column named ``label``,
    else none: labels -1) holds ClassLabel indices, whose names are the classes (-1, the
    hub's "no label", stays -1), or values under the manifest rules (integers or names).
    A file lacking a chosen column is a ``ManifestError`` naming it and its columns.
  - Planning reads only the label column, one row group at a time. Ids are
    ``<file relative to the root>/<row in file>``, stable as long as the files are.
  - Every file declares the same ClassLabel names (or none does): one label mapping for the
    dataset, else a ``ManifestError`` naming both files and both name lists.
  - Each record reads its image by (file, row group, row) (``ParquetCell``). A cell is a
    ``{bytes, path}`` struct whose ``bytes`` holds bytes, plain binary, or a string: a path
    relative to the data root that must resolve inside it (``relative_path``: no absolute
    path, no ``..``, no symlink leading out). A row without bytes (a null image, or a
    path-only struct), a ``bytes`` field that is not bytes (a string is never read as a
    path), a path outside the root, or bytes that do not decode make that image unreadable:
    a recorded skip under ``--on-bad-image skip``, the file, row and value named. Reading one
    image decodes its row group's image column; the last few are cached per process, which
    is cheap in store row order only when row groups are small (the hub writes 100 images
    per row group).
"""

from __future__ import annotations

import functools
import glob
import os
import re
from dataclasses import dataclass
from typing import Any

from featcache.datasets.core import (
    ACCEPTED_DATA,
    SPLIT_NAMES,
    DataOptions,
    Dataset,
    ManifestError,
    Reader,
    Record,
    parse_json,
    relative_id,
    relative_path,
    resolver,
)
from featcache.datasets.labels import parse_labels_if_any
from featcache.errors import BadImageError

__all__ = ["READER", "ParquetCell", "detect", "load"]

_HUB_NAME = re.compile(r"(?P<split>\w+?)-\d{5}-of-\d{5}\.parquet")


def _files_in(folder: str) -> list[str]:
    """The parquet files of a hub dataset folder: ``*.parquet``, ``data/*.parquet``,
    ``data/*/*.parquet``, ``<split>/*.parquet`` and ``<config>/<split>/*.parquet`` (split a
    ``SPLIT_NAMES`` name). Only those folders are listed, so a large image folder tree costs
    one listing of its top level and a few stats per subfolder."""
    folders = [folder, os.path.join(folder, "data")]
    folders += glob.glob(os.path.join(folder, "data", "*", ""))
    tops = [entry.path for entry in os.scandir(folder) if entry.is_dir()]
    for top in [folder, *tops]:
        folders += [os.path.join(top, s) for s in sorted(SPLIT_NAMES)]
    found = {
        f for d in folders if os.path.isdir(d) for f in glob.glob(os.path.join(d, "*.parquet"))
    }
    return sorted(found)


def detect(path: str) -> bool:
    """A ``.parquet`` file or glob, or a hub dataset folder holding parquet files."""
    if path.lower().endswith(".parquet"):
        return True
    return os.path.isdir(path) and bool(_files_in(path))


@functools.lru_cache(maxsize=4)
def _image_column(file: str, stamp: tuple[int, int], row_group: int, column: str) -> Any:
    """The image column of one row group (``stamp``: the file's mtime and size, so a file
    rewritten since is read again)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(row_group, columns=[column]).column(0)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + " ..."


@dataclass(frozen=True)
class ParquetCell:
    """One image's bytes: row ``row`` of row group ``row_group`` of ``column`` in ``file``;
    a path string in the cell is read under ``root``, the data root."""

    file: str
    row_group: int
    row: int
    column: str
    root: str

    def read(self) -> bytes:
        try:
            stat = os.stat(self.file)
            stamp = (stat.st_mtime_ns, stat.st_size)
            value = _image_column(self.file, stamp, self.row_group, self.column)[self.row]
            value = value.as_py()
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise BadImageError(self.file, f"cannot read the parquet row: {err}") from err
        where = f"row {self.row} of row group {self.row_group} of {self.file}"
        if isinstance(value, str):
            return self._file_bytes(value, where)
        data = value.get("bytes") if isinstance(value, dict) else value
        if data is not None and not isinstance(data, bytes):
            field = "the 'bytes' field" if isinstance(value, dict) else "the value"
            raise BadImageError(
                self.file,
                f"Expected {field} of column {self.column!r} to hold image bytes (binary) on "
                f"{where}. Got {type(data).__name__} {_shown(data)} instead.",
            )
        if not data:
            path = value.get("path") if isinstance(value, dict) else None
            only = f" (path {path!r} only)" if path else ""
            raise BadImageError(self.file, f"parquet row has no image bytes{only}")
        return data

    def _file_bytes(self, value: str, where: str) -> bytes:
        """The bytes of the file the path string ``value`` names under the data root."""
        column = f"path in column {self.column!r}"
        try:
            rid = relative_path(value, column, where, self.root, resolver(self.root))
        except ManifestError as err:
            raise BadImageError(self.file, str(err)) from None
        path = os.path.join(self.root, *rid.split("/"))
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise BadImageError(self.file, f"cannot read {value!r} on {where}: {err}") from err


def _files(path: str) -> tuple[str, list[str]]:
    """(root, parquet files)."""
    source = os.path.abspath(path)
    if os.path.isdir(source):
        return source, _files_in(source)
    if any(c in path for c in "*?["):
        root = os.path.dirname(re.split(r"[*?[]", source)[0])
        return root, sorted(glob.glob(source))
    return os.path.dirname(source), [source] if os.path.isfile(source) else []


def _features(schema: Any) -> dict[str, Any]:
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        features = parse_json(meta)["info"]["features"] if meta else {}
    except (ValueError, KeyError, TypeError):
        features = {}
    return features if isinstance(features, dict) else {}


def _columns(file: str, schema: Any, options: DataOptions) -> tuple[str, str | None, list | None]:
    """(image column, label column or None, ClassLabel names or None) of one file."""
    import pyarrow as pa

    features = _features(schema)
    names = schema.names
    image = options.image_column or next(
        (n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"),
        next(
            (
                n
                for n in names
                if pa.types.is_struct(schema.field(n).type)
                and schema.field(n).type.get_field_index("bytes") >= 0
            ),
            None,
        ),
    )
    label = options.label_column or next(
        (n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"),
        "label" if "label" in names else None,
    )
    for flag, column in (("--image-column", image), ("--label-column", label)):
        if (column is None and flag == "--image-column") or (
            column is not None and column not in names
        ):
            raise ManifestError(
                f"Expected an image column ({{bytes, path}} or binary) and an optional label "
                f"column in {file} (columns: {', '.join(names)}). Got {flag} "
                f"{column!r} instead."
            )
    feature = features.get(label) if label else None
    classes = feature.get("names") if isinstance(feature, dict) else None
    return image, label, classes if isinstance(classes, list) else None


def _mapping_differs(first: str, names: list | None, file: str, other: list | None) -> str:
    """The message for two files whose ClassLabel names differ (read with one mapping, a label
    would name another class in one of them)."""

    def listed(values: list | None) -> str:
        if values is None:
            return "no ClassLabel names"
        shown = repr(values) if len(values) <= 12 else f"{values[:12]!r} ... ({len(values)})"
        return f"names {shown}"

    at = ""
    if names is not None and other is not None:
        pairs = enumerate(zip(names, other, strict=False))
        index = next((i for i, (a, b) in pairs if a != b), min(len(names), len(other)))
        at = f"; they differ first at index {index}"
    return (
        f"Expected the same ClassLabel names in every parquet file (one label mapping). Got "
        f"{listed(names)} in {first} and {listed(other)} in {file}{at} instead."
    )


def _split_of(root: str, file: str) -> str:
    match = _HUB_NAME.fullmatch(os.path.basename(file))
    if match:
        return match["split"]
    parent = os.path.basename(os.path.dirname(file))
    return parent if parent in SPLIT_NAMES and os.path.dirname(file) != root else "train"


def load(path: str, options: DataOptions) -> Dataset:
    """Read Hugging Face parquet files (rules in the module doc)."""
    import pyarrow.parquet as pq

    options.check("Hugging Face parquet", ("image_column", "label_column"), path)
    root, files = _files(path)
    if not files:
        raise ManifestError(
            f"Expected {ACCEPTED_DATA} as --data. Got {path}, which matches no parquet file "
            "(it does not exist), instead."
        )
    entries = []  # (where, id, split, cell, label value)
    declared: list | None = None  # the first file's ClassLabel names, which all must share
    for file in files:
        try:
            handle = pq.ParquetFile(file)
        except (OSError, ValueError) as err:
            raise ManifestError(f"Expected a readable parquet file {file}. Got {err}.") from None
        image, label, names = _columns(file, handle.schema_arrow, options)
        if file == files[0]:
            declared = names
        elif names != declared:
            raise ManifestError(_mapping_differs(files[0], declared, file, names))
        relative, split, row = relative_id(root, file), _split_of(root, file), 0
        for group in range(handle.num_row_groups):
            count = handle.metadata.row_group(group).num_rows
            values = (
                handle.read_row_group(group, columns=[label]).column(0).to_pylist()
                if label
                else [None] * count
            )
            for index, value in enumerate(values):
                where = f"row {row} of {file}"
                cell = ParquetCell(file, group, index, image, root)
                entries.append((where, f"{relative}/{row}", split, cell, value))
                row += 1
    if not entries:
        raise ManifestError(f"Expected rows in {', '.join(files)}. Got none instead.")
    if declared is not None:
        classes = tuple(str(name) for name in declared)
        for where, _, _, _, value in entries:
            if not (isinstance(value, int) and -1 <= value < len(classes)):
                raise ManifestError(
                    f"Expected ClassLabel indices 0..{len(classes) - 1} (or -1, no label). Got "
                    f"{value!r} on {where} instead."
                )
        labels = [entry[4] for entry in entries]
    else:
        labels, classes = parse_labels_if_any([(entry[0], entry[4]) for entry in entries])
    records = [
        Record(rid, cell.file, label, split, None, member=cell)
        for (_, rid, split, cell, _), label in zip(entries, labels, strict=True)
    ]
    records.sort(key=lambda r: r.id)
    return Dataset(os.path.abspath(path), root, classes, tuple(records), format="hf-parquet")


READER = Reader("hf-parquet", "path", detect, load)
