"""Shard completion markers: one small Zarr group per completed shard, written last (after its
objects are on disk), naming every object of the shard with its size and digest. A shard
without a valid marker does not exist for readers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from featcache.jsontext import parse_json
from featcache.store.claims import _read_json
from featcache.store.storage import is_local, remove_stale_partials, sync_files, write_atomic

MARKER_ATTR = "featcache_marker"


class ShardMarkers:
    """``FeatureStore``'s markers: reading, validating and writing them, the rows they mark, and
    the cleanup of temp files in the folders of the shards they cover."""

    MARKER_DIR = "markers"

    def _marker_path(self, shard: int) -> str:
        return f"{self._path}/{self.MARKER_DIR}/shard-{shard:06d}/zarr.json"

    def _marker_problem(self, shard: int, meta: dict | None, problem: str | None) -> str | None:
        """Why the marker document ``meta`` of ``shard`` does not mark it; None when it does."""
        if problem or meta is None:
            return problem or "no completion marker (incomplete)"
        marker = (meta.get("attributes") or {}).get(MARKER_ATTR)
        if not isinstance(marker, dict):
            return "marker holds no featcache_marker attribute"
        if marker.get("store_id") != self.attrs["store_id"]:
            return f"marker belongs to another store (store id {marker.get('store_id')})"
        if marker.get("shard") != shard:
            return f"marker is that of shard {marker.get('shard')}"
        objects = marker.get("objects")
        if not isinstance(objects, dict) or sorted(objects) != sorted(self.array_names()):
            return "marker does not cover every array of the store"
        return None

    def _markers(self) -> dict[int, tuple[dict | None, str | None]]:
        """Per shard: (marker, None) for a valid marker, else (None, why it is not marked)."""
        paths = [self._marker_path(i) for i in range(self.num_shards)]
        try:
            existing = set(self._fs.glob(f"{self._path}/{self.MARKER_DIR}/shard-*/zarr.json"))
        except FileNotFoundError:
            existing = set()
        present = [path for path in paths if path in existing]
        found = self._fs.cat(present, on_error="return") if present else {}
        result = {}
        for shard, path in enumerate(paths):
            raw = found.get(path)
            meta, problem = None, None
            if isinstance(raw, bytes):
                try:
                    meta = parse_json(raw)
                except ValueError as err:  # not JSON, not UTF-8, nested too deeply
                    problem = f"marker is not valid JSON ({err})"
            elif raw is not None:
                problem = f"marker unreadable ({raw})"
            why = self._marker_problem(shard, meta if isinstance(meta, dict) else None, problem)
            result[shard] = (None, why) if why else (meta["attributes"][MARKER_ATTR], None)
        return result

    def valid_markers(self) -> dict[int, dict]:
        """{shard: its marker} of the shards whose marker is valid for this store (one listing
        and one read of every marker): the only shards that exist for readers. The reading is
        kept: reads prove their shards against it (``featcache.store.proof``)."""
        markers = {s: marker for s, (marker, _) in self._markers().items() if marker is not None}
        self._read_markers = markers
        return markers

    def marked_shards(self) -> set[int]:
        """Shards whose marker is valid for this store: the only shards that exist for readers."""
        return set(self.valid_markers())

    def read_marker(self, shard: int) -> dict | None:
        """The valid marker of ``shard`` (rows, skipped images, objects), else None."""
        meta, problem = _read_json(self._fs, self._marker_path(shard))
        if self._marker_problem(shard, meta, problem):
            return None
        return meta["attributes"][MARKER_ATTR]

    def marked_mask(self, marked: Iterable[int] | None = None) -> np.ndarray:
        """``(num_images,)`` bool: True for the rows of marked shards (the rows that exist);
        ``marked``: those shards, as already read (default: read the markers)."""
        mask = np.zeros(self.num_images, bool)
        for shard in self.marked_shards() if marked is None else marked:
            start, stop = self.shard_rows(shard)
            mask[start:stop] = True
        return mask

    def missing_shards(self) -> list[int]:
        marked = self.marked_shards()
        return [i for i in range(self.num_shards) if i not in marked]

    @property
    def is_complete(self) -> bool:
        return not self.missing_shards()

    def write_marker(self, shard: int, info: dict[str, Any]) -> None:
        """Write the shard's marker (a Zarr group), atomically: temp + fsync + rename locally."""
        marker = {"shard": shard, "store_id": self.attrs["store_id"], **info}
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {MARKER_ATTR: marker}}
        payload = json.dumps(meta, sort_keys=True).encode()
        path = self._marker_path(shard)
        if is_local(self._fs):
            write_atomic(path, [payload], sync=True)
        else:
            self._fs.pipe_file(path, payload)  # object stores: a PUT is atomic

    def unmark(self, shard: int) -> None:
        """Remove the marker of ``shard`` (before its objects are rewritten: a crash then leaves
        an unmarked shard, never a marker over other bytes); locally the folder of marker folders
        is fsynced after the removal. A shard without a marker is left as it is."""
        folder = os.path.dirname(self._marker_path(shard))
        if not self._fs.exists(folder):
            return
        self._fs.rm(folder, recursive=True)
        if is_local(self._fs):
            sync_files([os.path.dirname(folder)], self._path)

    def remove_stale_partials(self, shards: Iterable[int] | None = None) -> int:
        """Delete temp files of writers that are gone (``featcache.store.storage``) from the store's
        metadata folders and the folders of ``shards``' objects and markers (default: every
        shard); local stores only (object stores have no temp files). Returns how many."""
        if not is_local(self._fs):
            return 0
        shards = range(self.num_shards) if shards is None else shards
        directories = _metadata_dirs(self._path, self.array_names())
        for shard in shards:
            directories.add(os.path.dirname(self._marker_path(shard)))
            directories.update(
                os.path.dirname(f"{self._path}/{self.object_key(name, shard)}")
                for name in self.array_names()
            )
        return len(remove_stale_partials(directories))


def _metadata_dirs(path: str, arrays: list[str]) -> set[str]:
    """Folders holding the store's ``zarr.json`` documents (root, groups, arrays)."""
    return {path, f"{path}/layers", f"{path}/{ShardMarkers.MARKER_DIR}"} | {
        f"{path}/{name}" for name in arrays
    }
