"""Uncompressed feature shards as files: written and read directly, byte for byte as zarr's
sharding codec lays them out, and the digest a marker records for any object."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from featcache.store.storage import is_local, write_atomic

_ABSENT_CHUNK = 2**64 - 1  # a sharding index entry (offset and size) of a chunk never written


class ShardFiles:
    """``FeatureStore``'s shard objects below zarr: their digests, and the direct write and read
    of uncompressed feature shards."""

    def object_digest(self, name: str, data: bytes) -> int:
        """The digest a marker records for ``data``, an object of array ``name``.

        ``zlib.crc32(index + trailers)`` for a shard (sharding codec, index at the end:
        ``index`` is its last 16 * chunks + 4 bytes, ``trailers`` the last 4 bytes of each
        chunk it locates, in index order), ``zlib.crc32(trailer)`` for a plain chunk. Every
        chunk's codec chain ends with Crc32c, so the trailers are the chunks' checksums, and
        zarr checks each against its bytes on decode. Not a Crc32c over the whole object: a
        CRC of data followed by that data's own CRC is a constant, so it would be equal for
        every shard of one size. Raises ``ValueError`` for an object too short for its index.
        """
        chunks = self.chunks_per_object(name)
        if chunks is None:
            return zlib.crc32(data[-4:])
        index = data[-(16 * chunks + 4) :]
        if len(index) != 16 * chunks + 4:
            raise ValueError(f"{len(data)} bytes cannot hold the index of {chunks} chunks")
        return checksum_digest(index, [data[start:end] for start, end in trailer_spans(index)])

    def chunks_per_object(self, name: str) -> int | None:
        """Inner chunks in each object of array ``name`` (a shard), None for a plain chunk."""
        array = self.group[name]
        return None if array.shards is None else array.shards[0] // array.chunks[0]

    def _writes_shards_directly(self) -> bool:
        """Uncompressed feature shards are encoded here, byte for byte as zarr would
        (``tests/test_store_format.py``), and written as one file: zarr's own write path
        copies each inner chunk several times and runs at ~0.5 of a memmap write."""
        return self.attrs["compression"] == "none"

    def reads_shard_files(self, name: str) -> bool:
        """Whether ``read_shard_chunks`` can read array ``name``: an uncompressed sharded array
        of a local store (others are read through zarr)."""
        return (
            is_local(self._fs)
            and self.attrs["compression"] == "none"
            and self.group[name].shards is not None
        )

    def read_shard_chunks(
        self, name: str, shard: int, chunks: Iterable[int], buffer: Callable[[int], np.ndarray]
    ) -> Iterator[tuple[int, np.ndarray | None, int]]:
        """Inner chunks ``chunks`` (ascending) of array ``name``'s object for ``shard``, read
        straight from the file in the layout ``_write_shard_file`` writes (``reads_shard_files``
        must hold): yields ``(chunk, values, nbytes)``, ``values`` (inner, *row_shape) in the
        array's dtype, a view into ``buffer(n)`` (a caller's reusable uint8 buffer of at least n
        bytes) valid until the next item, or None for an absent chunk (the fill value);
        ``nbytes`` the bytes read for it (the first item also counts the index).

        The object is proven against its marker first (``ShardProofError``), then the index is
        read and checked against its Crc32c, then each chunk in offset order,
        each byte once, and checked against its Crc32c, as zarr's decode does. A short or
        malformed object raises ``ValueError`` naming the chunk; a missing one, ``OSError``.
        """
        import crc32c

        self.prove(name, [shard])  # featcache.store.proof: the object is the marker's
        array = self.group[name]
        inner, row_shape = array.chunks[0], array.shape[1:]
        per_shard = self.shard_size // inner
        dtype = array.dtype.newbyteorder("<")
        chunk_bytes = inner * int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        index_bytes = 16 * per_shard + 4
        with open(f"{self._path}/{self.object_key(name, shard)}", "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < index_bytes:
                raise ValueError(f"{size} bytes cannot hold the index of {per_shard} chunks")
            tail = os.pread(handle.fileno(), index_bytes, size - index_bytes)
            if crc32c.crc32c(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
                raise ValueError("the shard index fails its Crc32c checksum")
            index = np.frombuffer(tail[:-4], dtype="<u8").reshape(per_shard, 2)
            data = buffer(chunk_bytes + 4)
            counted = index_bytes
            for chunk in chunks:
                offset, length = (int(v) for v in index[chunk])
                if offset == _ABSENT_CHUNK:
                    yield chunk, None, counted
                    counted = 0
                    continue
                if length != chunk_bytes + 4 or offset + length > size - index_bytes:
                    raise ValueError(
                        f"chunk {chunk} is {length} bytes at offset {offset} of a {size}-byte "
                        f"object; expected {chunk_bytes + 4} bytes before the index"
                    )
                view = memoryview(data)[:length]
                if handle.seek(offset) != offset or handle.readinto(view) != length:
                    raise ValueError(f"chunk {chunk} is cut short (object truncated)")
                values, trailer = data[:chunk_bytes], data[chunk_bytes:length].tobytes()
                if crc32c.crc32c(values) != int.from_bytes(trailer, "little"):
                    raise ValueError(f"Stored and computed checksum of chunk {chunk} do not match")
                yield chunk, values.view(dtype).reshape(inner, *row_shape), counted + length
                counted = 0

    def _write_shard_file(self, name: str, shard: int, values: np.ndarray) -> dict:
        """Encode one shard of a feature array (Zarr v3 sharding codec), write it, return its
        object record (its digest from the checksums made on the way: no pass over the data).

        Layout: inner chunks of ``inner`` images in Morton order (along the image axis only,
        so plain order), each the raw little-endian bytes followed by their Crc32c; then the
        index, one (offset, nbytes) uint64 pair per inner chunk, followed by its Crc32c.
        Inner chunks past the array's last row are absent (2**64-1 pairs); a chunk that the
        last row cuts is padded with the fill value, as zarr writes it.
        """
        import crc32c

        array = self.group[name]
        inner = array.chunks[0]
        per_shard = self.shard_size // inner
        row_shape = values.shape[1:]
        fill = np.array(array.metadata.fill_value, dtype=array.dtype)
        parts: list[bytes | memoryview] = []
        index = np.full((per_shard, 2), _ABSENT_CHUNK, dtype="<u8")
        offset, trailers = 0, []
        for chunk in range(per_shard):
            rows = values[chunk * inner : (chunk + 1) * inner]
            if len(rows) == 0:
                break
            if len(rows) < inner:
                padded = np.empty((inner, *row_shape), dtype=array.dtype)
                padded[...] = fill
                padded[: len(rows)] = rows
                rows = padded
            contiguous = np.ascontiguousarray(rows, dtype=array.dtype.newbyteorder("<"))
            raw = memoryview(contiguous).cast("B")  # the bytes, without a copy
            checksum = crc32c.crc32c(raw).to_bytes(4, "little")
            trailers.append(checksum)
            parts += [raw, checksum]
            index[chunk] = (offset, contiguous.nbytes + 4)
            offset += contiguous.nbytes + 4
        index_bytes = index.tobytes()
        index_checksum = crc32c.crc32c(index_bytes).to_bytes(4, "little")
        digest = checksum_digest(index_bytes + index_checksum, trailers)
        parts += [index_bytes, index_checksum]
        key = self.object_key(name, shard)
        path = f"{self._path}/{key}"
        if is_local(self._fs):
            write_atomic(path, parts)
        else:
            self._fs.pipe_file(path, b"".join(parts))  # object stores: a PUT is atomic
        return {"key": key, "nbytes": offset + len(index_bytes) + 4, "digest": digest}


def trailer_spans(index: bytes) -> list[tuple[int, int]]:
    """(start, end) in the object of the 4-byte Crc32c trailer of each chunk that the sharding
    ``index`` (16 bytes per chunk, then its own 4-byte checksum) locates, in index order."""
    entries = np.frombuffer(index[:-4], dtype="<u8").reshape(-1, 2)
    return [
        (offset + nbytes - 4, offset + nbytes)
        for offset, nbytes in entries.tolist()
        if offset != _ABSENT_CHUNK
    ]


def checksum_digest(index: bytes, trailers: Iterable[bytes]) -> int:
    """The digest a marker records for a shard: ``zlib.crc32`` of its index, then its chunks'
    trailers (``ShardFiles.object_digest``)."""
    return zlib.crc32(b"".join([index, *trailers]))
