"""Reads prove their shard: no reader uses a marked shard's object that its marker does not vouch
for.

Before the first read of array ``name``'s object of a marked shard through an open
``FeatureStore`` (``read``, ``read_stored``, ``read_shard_chunks``, ``prove`` for readers that
go through zarr or dask themselves), the object's size and digest are compared with its marker's
record; a mismatch raises ``ShardProofError`` naming the store, array and shard and pointing to
``featcache verify``. The digest is the one the marker records (``ShardFiles.object_digest``):
``zlib.crc32`` of a shard's index and the 4-byte Crc32c trailer of each chunk it locates, or of a
plain chunk's trailer. Taking it reads the index and the trailers (small range reads, one file
open locally, batched ranges on object stores), never the data, and it is taken once per
(array, shard) per open store; zarr (or the direct reader) then checks every chunk's bytes
against its trailer as it decodes them. So a swapped, replaced, copied, deleted or truncated
object, and an edited marker, are refused at the first read, and a missing object of a marked
shard is an error, never fill values. Shards without a valid marker do not exist for readers:
they read as the fill values and callers leave their rows out (``marked_mask``).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable

import numpy as np

from featcache.store.errors import ShardProofError
from featcache.store.shard_files import checksum_digest, trailer_spans
from featcache.store.storage import is_local

__all__ = ["ShardProof"]

_Spans = list[tuple[int, int]]


class ShardProof:
    """``FeatureStore``'s read-time proof of marked shards (module docstring)."""

    def proven_objects(self) -> set[tuple[str, int]]:
        """(array, shard) of every object proven by this open store so far."""
        return set(self._proven)

    def prove(self, name: str, shards: Iterable[int] | None = None) -> None:
        """Prove array ``name``'s objects of the marked ones of ``shards`` (default: every
        shard) against their markers, each once per open store; else ``ShardProofError``."""
        markers = self._reading_markers()
        for shard in range(self.num_shards) if shards is None else shards:
            if (name, shard) in self._proven or shard not in markers:
                continue
            fault = self.object_fault(name, shard, markers[shard]["objects"][name])
            if fault:
                raise ShardProofError(self.url, name, shard, self.shard_rows(shard), fault)
            self._proven.add((name, shard))  # reader threads may add side by side

    def shards_of(self, rows: slice | np.ndarray | int | None) -> list[int]:
        """The shards (ascending) holding ``rows`` (a selection as ``read`` takes it)."""
        n, size = self.num_images, self.shard_size
        if rows is None or isinstance(rows, slice):
            start, stop, _ = (rows or slice(None)).indices(n)
            return list(range(start // size, (stop - 1) // size + 1)) if start < stop else []
        picked = np.asarray(rows)
        if picked.dtype == bool:
            picked = np.flatnonzero(picked)
        picked = picked.astype(np.int64).ravel()
        picked = np.where(picked < 0, picked + n, picked)
        return np.unique(picked[(picked >= 0) & (picked < n)] // size).tolist()

    def object_fault(self, name: str, shard: int, record: dict) -> str | None:
        """How array ``name``'s object of ``shard`` differs from its marker ``record`` (key,
        nbytes, digest): missing, another size, another digest; None when it matches."""
        key = self.object_key(name, shard)
        if record.get("key") != key:
            return f"marker names object {record.get('key')}, expected {key}"
        size, digest = self._object_checksums(name, key)
        if size is None:
            return f"object {key} is missing"
        if size != record.get("nbytes"):
            return (
                f"object {key} holds {size} bytes, its marker says {record.get('nbytes')} "
                "(truncated or replaced)"
            )
        if digest != record.get("digest"):
            return (
                f"object {key} differs from its marker's digest (corrupted, replaced or "
                "swapped with another shard's)"
            )
        return None

    def _reading_markers(self) -> dict[int, dict]:
        """The valid markers as this store last read them (``valid_markers``), read now if
        never: the shards that exist for its readers."""
        markers = self._read_markers
        return self.valid_markers() if markers is None else markers

    def _object_checksums(self, name: str, key: str) -> tuple[int | None, int | None]:
        """(size, digest) of the object at ``key`` of array ``name`` from its index and chunk
        trailers; (None, None) when it is missing; digest None when its index is malformed."""
        path, chunks = f"{self._path}/{key}", self.chunks_per_object(name)
        if is_local(self._fs):
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None, None
            try:  # unbuffered: only the bytes asked for are read

                def read(spans: _Spans) -> list[bytes]:
                    return [os.pread(descriptor, end - start, start) for start, end in spans]

                size = os.fstat(descriptor).st_size
                return size, _digest(chunks, size, read)
            finally:
                os.close(descriptor)
        try:
            size = int(self._fs.size(path))
        except FileNotFoundError:
            return None, None

        def read_ranges(spans: _Spans) -> list[bytes]:
            starts, ends = [start for start, _ in spans], [end for _, end in spans]
            return list(self._fs.cat_ranges([path] * len(spans), starts, ends, on_error="raise"))

        return size, _digest(chunks, size, read_ranges)


def _digest(chunks: int | None, size: int, read: Callable[[_Spans], list[bytes]]) -> int | None:
    """The marker digest of a ``size``-byte object with ``chunks`` inner chunks (None: a plain
    chunk), reading only its index and trailers through ``read``; None if the index is
    malformed (a chunk outside the object)."""
    if chunks is None:
        return zlib.crc32(read([(max(0, size - 4), size)])[0])
    index_bytes = 16 * chunks + 4
    if size < index_bytes:
        return None
    (index,) = read([(size - index_bytes, size)])
    spans = trailer_spans(index)
    if any(start < 0 or end > size - index_bytes for start, end in spans):
        return None
    return checksum_digest(index, read(spans) if spans else [])
