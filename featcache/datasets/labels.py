"""Labels from the values a reader found (manifest columns, webdataset ``cls``, parquet
columns): class indices or class names, never both.

Rules (tested in tests/test_data.py):
  - Labels are either all integers >= 0 (class indices, classes "0".."max") or all class names
    (indexed by sorted name). Without a label column every label is -1 and there are no classes.
    Integer labels must stay below min(100000, max(1000, 10 x rows)): every index up to the
    largest becomes a class, so a stray huge index would make millions of empty classes
    (tested in tests/test_redteam_data.py).
"""

from __future__ import annotations

import re
from typing import Any

from featcache.datasets.core import ManifestError

__all__ = ["parse_labels", "parse_labels_if_any"]

_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_ACCEPTED_LABELS = "labels that are all integers >= 0 (class indices) or all class names"
_MAX_CLASSES = 100_000


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


def parse_labels_if_any(entries: list[tuple[str, Any]]) -> tuple[list[int], tuple[str, ...]]:
    """``parse_labels`` when any value is not None, else every entry unlabelled (-1, no classes):
    the rule of corpora whose samples may carry no label (webdataset, parquet)."""
    if any(value is not None for _, value in entries):
        return parse_labels(entries)
    return [-1] * len(entries), ()


def parse_labels(entries: list[tuple[str, Any]]) -> tuple[list[int], tuple[str, ...]]:
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
