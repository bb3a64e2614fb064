"""Whole stores under a root: finding every featcache store, and removing one (and nothing
that featcache did not write)."""

from __future__ import annotations

from dataclasses import dataclass

from featcache.store.claims import _check_not_file, _foreign_entries, _read_json, _root_claim
from featcache.store.errors import StoreError
from featcache.store.feature_store import FeatureStore
from featcache.store.layout import NON_ROOT_NAMES
from featcache.store.storage import fs_and_path

__all__ = ["DamagedStore", "find_stores", "remove_store", "scan_stores"]


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


@dataclass(frozen=True)
class DamagedStore:
    """A featcache store under a root that does not open: its URL and the one-line reason
    (``FeatureStore.open``'s ``StoreError``), so a listing names it instead of dropping it."""

    url: str
    reason: str


def scan_stores(
    root: str, *, storage_options: dict | None = None
) -> tuple[list[FeatureStore], list[DamagedStore]]:
    """Every featcache store under ``root`` (the root itself, or any depth below it): those
    that open, and those that do not (``DamagedStore``), each sorted by URL.

    A store is a directory whose ``zarr.json`` is a group with ``featcache`` attributes, or an
    unreadable ``zarr.json`` beside a ``markers`` or ``layers`` folder (names only featcache
    stores hold together); it is damaged when opening refuses it (metadata edited or damaged,
    an interrupted creation). Any other ``zarr.json`` (a foreign Zarr group or array) is no
    store and is left out.
    """
    fs, path = fs_and_path(root, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found: dict[str, FeatureStore] = {}
    damaged: dict[str, DamagedStore] = {}
    for meta in sorted(fs.glob(f"{path}/**/zarr.json") + fs.glob(f"{path}/zarr.json")):
        directory = meta.rsplit("/", 1)[0]
        inside = directory[len(path) :]
        if "/layers" in inside or "/markers" in inside or directory.endswith(NON_ROOT_NAMES):
            continue
        url = directory if protocol in ("file", "local") else f"{protocol}://{directory}"
        try:
            store = FeatureStore.open(url, storage_options=storage_options)
        except StoreError as err:
            if _is_featcache_store(fs, directory, url):
                damaged[url] = DamagedStore(url, " ".join(str(err).split()))
            continue
        found[store.url] = store
    return list(found.values()), list(damaged.values())


def find_stores(root: str, *, storage_options: dict | None = None) -> list[FeatureStore]:
    """Every featcache store under ``root`` that opens (``scan_stores`` without the damaged
    ones): the stores a caller can read."""
    return scan_stores(root, storage_options=storage_options)[0]


def _is_featcache_store(fs, directory: str, url: str) -> bool:
    """Whether ``directory`` is a featcache store (see ``scan_stores``), readable or not."""
    try:
        return _root_claim(fs, directory, url) is not None
    except StoreError:  # unreadable zarr.json, or a group featcache did not create
        _, problem = _read_json(fs, f"{directory}/zarr.json")
        return problem is not None and any(
            fs.isdir(f"{directory}/{name}") for name in ("markers", "layers")
        )
