"""featcache.datasets: reading ``--data`` (folders, manifests, dataset layouts, corpora) into a
``Dataset`` of ``Record``s.

The types, options and errors live in ``featcache.datasets.core``; one module per reader
(``folders``, ``manifests``, ``ade20k``, ``fmow``, ``inat``, ``aircraft``, ``llava``, ``wds``,
``hf_parquet``), none importing another; ``loading`` holds the reader table and
``load_dataset``; ``subsets`` the class-balanced subsets; ``labels`` the label rules shared by
the readers. Importing the package is cheap (no torch): ``load_dataset``, ``reopen_dataset``
and ``READERS`` import the readers on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from featcache.datasets.core import (
    ACCEPTED_DATA,
    IMAGE_EXTENSIONS,
    MASK_IGNORE,
    NO_DIGEST,
    SPLIT_NAMES,
    DataOptions,
    Dataset,
    Loaded,
    ManifestError,
    MaskLabelError,
    MaskLabels,
    Member,
    Reader,
    Record,
    content_digest,
)

if TYPE_CHECKING:
    from featcache.datasets.loading import READERS, load_dataset, reopen_dataset

# Attribute -> the module it is imported from on first access (that module imports every reader).
_LAZY = {
    "READERS": "featcache.datasets.loading",
    "load_dataset": "featcache.datasets.loading",
    "reopen_dataset": "featcache.datasets.loading",
}

__all__ = [
    "ACCEPTED_DATA",
    "IMAGE_EXTENSIONS",
    "MASK_IGNORE",
    "NO_DIGEST",
    "READERS",
    "SPLIT_NAMES",
    "DataOptions",
    "Dataset",
    "Loaded",
    "ManifestError",
    "MaskLabelError",
    "MaskLabels",
    "Member",
    "Reader",
    "Record",
    "content_digest",
    "load_dataset",
    "reopen_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featcache.datasets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
