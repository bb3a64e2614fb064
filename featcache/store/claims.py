"""What a path holds before featcache adopts, writes into or removes it: the root group's
``featcache`` claim, entries no store holds, and JSON documents read without raising."""

from __future__ import annotations

from featcache.jsontext import parse_json
from featcache.store.errors import StoreError
from featcache.store.layout import _STORE_NAMES


def _read_json(fs, path: str) -> tuple[dict | None, str | None]:
    """(parsed JSON object, None) or (None, why it could not be read); missing -> (None, None)."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    try:
        value = parse_json(raw)
    except ValueError as err:  # not JSON, not UTF-8, nested too deeply
        return None, f"{path} is not valid JSON ({err})"
    if not isinstance(value, dict):
        return None, f"{path} holds {type(value).__name__}, not a JSON object"
    return value, None


def _root_claim(fs, path: str, url: str) -> dict | None:
    """The ``featcache`` attrs of the group at ``path``; None when there is no ``zarr.json``.

    Raises ``StoreError`` for an unreadable ``zarr.json`` or a Zarr group featcache did not
    create (no ``featcache`` attrs): neither may be adopted, written into or deleted.
    """
    meta, problem = _read_json(fs, f"{path}/zarr.json")
    if problem:
        raise StoreError(f"Cannot read {url!r} as a featcache store: {problem}.")
    if meta is None:
        return None
    claim = (meta.get("attributes") or {}).get("featcache")
    if meta.get("node_type") != "group" or not isinstance(claim, dict):
        raise StoreError(
            f"{url!r} is a Zarr {meta.get('node_type', 'node')} that featcache did not create "
            "(no 'featcache' attrs); featcache neither writes into nor removes it. Choose "
            "another --out."
        )
    return claim


def _foreign_entries(fs, path: str) -> list[str]:
    """Names directly under ``path`` that no featcache store holds (temp files aside)."""
    try:
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    known = (*_STORE_NAMES, "markers")
    return sorted(n for n in names if n not in known and not n.endswith(".partial"))


def _check_not_file(fs, path: str, url: str) -> None:
    if fs.isfile(path):
        raise StoreError(
            f"Expected a store directory (or a new path) at {url!r}. Got an existing file "
            "instead; choose another --out."
        )
