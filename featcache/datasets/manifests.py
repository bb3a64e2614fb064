"""CSV and JSONL manifests: one row per image, paths relative to the manifest's folder.

Rules (each tested in tests/test_data.py):
  - A manifest (``.csv`` with a header row, or ``.jsonl`` with one object a line) needs a ``path``
    column; ``label``, ``split`` (default "train") and ``mask`` are optional, others ignored.
    Paths are relative to the manifest's folder and may not leave it; they need not exist yet
    (the extractor reports missing files at decode time). Labels follow
    featcache/datasets/labels.py.
  - A split has a mask on every row or on none.
  - A manifest that is not UTF-8 (the line is named) or a JSONL line that is not JSON (nested
    too deep included) is a ``ManifestError``.
This is the last row of the reader table: whatever no other reader detects is read here, and
anything but a ``.csv`` or ``.jsonl`` file is the error naming what ``--data`` accepts.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from featcache.datasets.core import (
    ACCEPTED_DATA,
    DataOptions,
    Dataset,
    ManifestError,
    MaskLabels,
    Reader,
    Record,
    absolute_path,
    parse_json,
    read_text,
    relative_path,
    resolver,
)
from featcache.datasets.labels import parse_labels

__all__ = ["READER", "detect", "load"]


def detect(file: str) -> bool:
    """Anything that is not a folder and no other reader took (``load`` refuses what is not a
    ``.csv`` or ``.jsonl`` file)."""
    return True


def load(source: str, options: DataOptions, reduce_zero_label: bool | None = None) -> Dataset:
    """Read the ``.csv`` or ``.jsonl`` manifest ``source`` (rules in the module doc)."""
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


def _read_csv(file: str) -> list[tuple[int, dict[str, Any]]]:
    """Data rows as (line number, column -> value), the header being line 1."""
    with io.StringIO(read_text(file), newline="") as handle:
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
    with io.StringIO(read_text(file), newline=None) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = parse_json(line)
            except ValueError as err:
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


def _load_rows(
    source: str, rows: list[tuple[int, dict[str, Any]]], mask_labels: MaskLabels
) -> Dataset:
    root = os.path.dirname(source)
    if not rows:
        raise ManifestError(f"Expected at least one data row in {source}. Got none instead.")
    seen: dict[str, int] = {}
    resolve = resolver(root)
    parsed = []  # (line, id, split, mask id or None, label value); no strings per row kept
    for line, row in rows:
        where = f"line {line} of {source}"
        rid = relative_path(row.get("path"), "path", where, root, resolve)
        if rid in seen:
            raise ManifestError(
                f"Expected each path once in {source}. Got {rid!r} on line {seen[rid]} "
                f"and again on line {line} instead."
            )
        seen[rid] = line
        mask = row.get("mask")
        mask = None if mask in (None, "") else relative_path(mask, "mask", where, root, resolve)
        split = "train" if row.get("split") is None else str(row["split"]).strip() or "train"
        parsed.append((line, rid, split, mask, row.get("label")))
    del seen
    if any("label" in row for _, row in rows):
        labels, classes = parse_labels([(f"line {p[0]} of {source}", p[4]) for p in parsed])
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
        Record(rid, absolute_path(root, rid), label, split, mask and absolute_path(root, mask))
        for (_, rid, split, mask, _), label in zip(parsed, labels, strict=True)
    ]
    records = tuple(sorted(records, key=lambda r: r.id))
    return Dataset(source, root, classes, records, mask_labels, format="manifest")


READER = Reader("manifest", "file", detect, load, mask_labels=True)
