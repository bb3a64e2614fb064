"""What opening a store checks before anything is read: the root attributes against each other,
and every array's and group's ``zarr.json`` against them.

A store whose metadata was edited or damaged (a ``zarr.json`` deleted, cut or rewritten,
``num_images``, ``shard_size`` or ``num_shards`` changed) is refused at ``FeatureStore.open``
with one ``StoreError`` naming the file or attribute and what was expected, so no reader meets it
later as a traceback. The rules:

- ``dataset.num_images`` (>= 0), ``shard_size`` (>= 1), ``num_shards`` and ``id_width`` (>= 1)
  are integers, ``num_shards = ceil(num_images / shard_size)``; ``layers`` a list of integers,
  ``arrays`` a list of names holding every feature array the attributes imply and ``ids``,
  ``labels``, ``valid``;
- the groups ``layers`` (when the store has layers) and ``markers`` and every array of
  ``arrays`` open as Zarr nodes of that kind;
- every array holds ``num_images`` rows in chunks (or shards) of ``shard_size`` rows, and the
  dtype its name implies: the attributes' storage ``dtype`` for feature arrays, uint8 ids of
  ``id_width`` bytes, int64 labels, bool valid, int16 masks of ``mask_shape``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from featcache.store.errors import StoreError

__all__ = ["check_consistency"]

_DTYPES = {"ids": "uint8", "labels": "int64", "valid": "bool", "masks": "int16"}


def check_consistency(url: str, group: zarr.Group, attrs: dict[str, Any]) -> None:
    """Raise ``StoreError`` for the first contradiction in the store's metadata (module rules)."""
    fault = _attribute_fault(attrs) or _node_fault(group, attrs)
    if fault:
        raise StoreError(
            f"Store {url} is damaged: {fault}. Its metadata was edited or damaged after "
            "extraction; remove it (featcache rm) and extract it again."
        )


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _attribute_fault(attrs: dict[str, Any]) -> str | None:
    dataset = attrs.get("dataset")
    num_images = dataset.get("num_images") if isinstance(dataset, dict) else None
    checks = (
        ("dataset.num_images", num_images, 0),
        ("shard_size", attrs.get("shard_size"), 1),
        ("num_shards", attrs.get("num_shards"), 0),
        ("id_width", attrs.get("id_width"), 1),
    )
    for name, value, least in checks:
        if not _is_int(value, least):
            return f"expected root attribute {name} an integer >= {least}. Got {value!r} instead"
    shards = -(-num_images // attrs["shard_size"])
    if attrs["num_shards"] != shards:
        return (
            "expected root attribute num_shards = ceil(dataset.num_images / shard_size) = "
            f"ceil({num_images} / {attrs['shard_size']}) = {shards}. Got "
            f"{attrs['num_shards']} instead"
        )
    layers, names = attrs.get("layers"), attrs.get("arrays")
    if not isinstance(layers, list) or not all(_is_int(n, 0) for n in layers):
        return f"expected root attribute layers a list of layer numbers. Got {layers!r} instead"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"expected root attribute arrays a list of array names. Got {names!r} instead"
    tokens = attrs.get("tokens")
    implied = [f"layers/{n}" for n in layers] if tokens != "pooled" else []
    implied += ["final"] if tokens != "pooled" else []
    absent = [n for n in [*implied, "pooled", "ids", "labels", "valid"] if n not in names]
    if absent:
        return f"expected root attribute arrays to list {', '.join(absent)}. Got {names} instead"
    return None


def _node_fault(group: zarr.Group, attrs: dict[str, Any]) -> str | None:
    groups = (["layers"] if any(n.startswith("layers/") for n in attrs["arrays"]) else []) + [
        "markers"
    ]
    for name in [*groups, *attrs["arrays"]]:
        kind = zarr.Group if name in groups else zarr.Array
        try:
            node = group[name]
        except Exception as err:  # missing (KeyError), not JSON, not valid Zarr metadata
            reason = "missing" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
            reason = " ".join(reason.split())
            return f"{name}/zarr.json cannot be read as a Zarr {kind.__name__.lower()} ({reason})"
        if not isinstance(node, kind):
            wanted, found = kind.__name__.lower(), type(node).__name__.lower()
            return f"{name}/zarr.json is a Zarr {found}, expected a Zarr {wanted}"
        if kind is zarr.Array:
            fault = _array_fault(name, node, attrs)
            if fault:
                return fault
    return None


def _array_fault(name: str, array: zarr.Array, attrs: dict[str, Any]) -> str | None:
    """How array ``name``'s metadata contradicts the root attributes, else None."""
    num_images, shard_size = attrs["dataset"]["num_images"], attrs["shard_size"]
    rows_per_object = (array.shards or array.chunks)[0]
    if array.shape[0] != num_images:
        return (
            f"expected {name} to hold dataset.num_images {num_images} rows (root attribute). "
            f"Got {array.shape[0]} rows instead ({name}/zarr.json)"
        )
    if rows_per_object != shard_size:
        return (
            f"expected {name} in objects of shard_size {shard_size} rows (root attribute). Got "
            f"{rows_per_object} instead ({name}/zarr.json)"
        )
    feature = name in ("pooled", "final") or name.startswith("layers/")
    expected = attrs.get("dtype") if feature else _DTYPES.get(name)
    if expected is not None and np.dtype(array.dtype) != np.dtype(expected):
        return f"expected {name} of dtype {expected}. Got {array.dtype} instead ({name}/zarr.json)"
    if name == "ids" and array.shape[1:] != (attrs["id_width"],):
        return (
            f"expected ids rows of id_width {attrs['id_width']} bytes (root attribute). Got "
            f"{array.shape[1:]} instead (ids/zarr.json)"
        )
    mask_shape = attrs.get("mask_shape")
    if name == "masks" and mask_shape and list(array.shape[1:]) != list(mask_shape):
        return (
            f"expected masks of mask_shape {mask_shape} (root attribute). Got "
            f"{list(array.shape[1:])} instead (masks/zarr.json)"
        )
    return None
