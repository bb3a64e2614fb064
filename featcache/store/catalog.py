"""Whole stores under a root: finding every featcache store, and removing one (and nothing
that featcache did not write)."""

from __future__ import annotations

from featcache.store.claims import _check_not_file, _foreign_entries, _root_claim
from featcache.store.errors import StoreError
from featcache.store.feature_store import FeatureStore
from featcache.store.layout import NON_ROOT_NAMES
from featcache.store.storage import fs_and_path


def remove_store(url: str, *, storage_options: dict | None = None) -> None:
    """Delete a featcache store (any format version, complete or interrupted), and nothing else.

    Refused (``StoreError``, nothing deleted): a path with no ``zarr.json``, a Zarr group
    featcache did not create, or a store directory that also holds entries featcache does not
    write (a user's file, a foreign array): those are named so they can be moved first.
    """
    fs, path = fs_and_path(url, storage_options)
    _check_not_file(fs, path, url)
    if _root_claim(fs, path, url) is None:
        raise StoreError(f"No featcache store at {url!r} (no zarr.json there); nothing removed.")
    foreign = _foreign_entries(fs, path)
    layers = f"{path}/layers"
    if fs.isdir(layers):
        foreign += [
            f"layers/{n}"
            for n in (e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(layers, detail=False))
            if not (n.isdigit() or n == "zarr.json" or n.endswith(".partial"))
        ]
    if foreign:
        raise StoreError(
            f"{url!r} is a featcache store that also holds {', '.join(foreign[:5])}, which "
            "featcache did not write; nothing removed. Move those out first."
        )
    fs.rm(path, recursive=True)


def find_stores(root: str, *, storage_options: dict | None = None) -> list[FeatureStore]:
    """Every featcache store under ``root`` (the root itself, or any depth below it)."""
    fs, path = fs_and_path(root, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = []
    for meta in sorted(fs.glob(f"{path}/**/zarr.json") + fs.glob(f"{path}/zarr.json")):
        directory = meta.rsplit("/", 1)[0]
        inside = directory[len(path) :]
        if "/layers" in inside or "/markers" in inside or directory.endswith(NON_ROOT_NAMES):
            continue
        url = directory if protocol in ("file", "local") else f"{protocol}://{directory}"
        try:
            found.append(FeatureStore.open(url, storage_options=storage_options))
        except StoreError:
            continue
    unique = {store.url: store for store in found}
    return list(unique.values())
