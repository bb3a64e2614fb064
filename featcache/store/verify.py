"""Verification of a store's marked shards: cheap size checks, and the full check of every
object against its marker's size and digest (``featcache.store.proof``, the check every read
makes), every chunk's Crc32c and finite features."""

from __future__ import annotations

import numpy as np

from featcache.store.errors import UnreadableShardError


class StoreVerification:
    """``FeatureStore``'s checks: ``object_faults`` (sizes only) and ``verify`` (every byte)."""

    def object_faults(
        self, names: list[str] | None = None, markers: dict[int, dict] | None = None
    ) -> list[str]:
        """Cheap check of marked shards: each object of ``names`` (default: every array) exists
        with the size its marker records. One listing per array; no data is read.
        ``markers``: ``valid_markers()`` as already read (default: read them)."""
        faults = []
        markers = self.valid_markers() if markers is None else markers
        for name in names or self.array_names():
            try:
                sizes = self._fs.find(f"{self._path}/{name}/c", detail=True)
            except FileNotFoundError:
                sizes = {}
            sizes = {path: info.get("size") for path, info in sizes.items()}
            for shard, marker in sorted(markers.items()):
                record = marker["objects"][name]
                size = sizes.get(f"{self._path}/{record['key']}")
                fault = _size_fault(shard, name, record, size)
                faults += [fault] if fault else []
        return faults

    def notes(self) -> list[str]:
        """What the store lacks that is not a fault: a format-2 store has no row digests (and
        no file stamps), so pairing compares its ids only and a changed image goes unseen."""
        if self.format_version >= 3:
            return []
        return [
            f"format {self.format_version} store: no row digests (the content identity of "
            "format 3) and no file stamps, so pairing compares ids only and images changed "
            "since extraction go unseen; extract it again for them"
        ]

    def verify(self, expected_fingerprint: str | None = None) -> list[str]:
        """Every fault of the store; an empty list means every shard is proven complete.

        Per shard: a valid marker of this store and shard; for every array, the object its
        marker names exists at the expected key with the recorded size and digest (catches
        deleted, truncated, swapped or replaced objects and foreign markers); then every
        chunk decodes (zarr's own Crc32c) and valid rows hold finite features.
        """
        faults = []
        if expected_fingerprint and expected_fingerprint != self.attrs["encoder"]["fingerprint"]:
            faults.append(
                f"encoder fingerprint {self.attrs['encoder']['fingerprint']} differs from "
                f"expected {expected_fingerprint}"
            )
        markers = self._markers()
        self._read_markers = {s: m for s, (m, _) in markers.items() if m is not None}
        for shard, (marker, problem) in sorted(markers.items()):
            if marker is None:
                faults.append(f"shard {shard}: {problem}")
                continue
            shard_faults = []
            for name in self.array_names():
                fault = self.object_fault(name, shard, marker["objects"][name])
                shard_faults += [f"shard {shard}: {name} {fault}"] if fault else []
            if not shard_faults:  # what the reads below would prove again
                self._proven.update((name, shard) for name in self.array_names())
            faults += shard_faults or self._decode_faults(shard)
        return faults

    def _decode_faults(self, shard: int) -> list[str]:
        """Decode every array of ``shard`` through zarr (each chunk against its Crc32c); valid
        rows must hold finite features. One fault per array that fails, naming it."""
        start, stop = self.shard_rows(shard)
        faults, values = [], {}
        for name in self.array_names():
            try:
                values[name] = self.read(name, slice(start, stop))
            except Exception as err:  # checksum or decode failures surface as various types
                cause = err.__cause__ if isinstance(err, UnreadableShardError) else err
                reason = " ".join(f"{type(cause).__name__}: {cause}".split())
                faults.append(
                    f"shard {shard}: {name} object {self.object_key(name, shard)} does not "
                    f"decode (a chunk fails its checksum, or worse): {reason}"
                )
        valid = values.get("valid")
        for name in self.feature_arrays():
            if valid is None or name not in values:
                continue
            rows = values[name]
            bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1) & valid
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                faults.append(
                    f"shard {shard}: {name} has non-finite values in valid row {row} "
                    f"({int(bad.sum())} rows)"
                )
        return faults


def _size_fault(shard: int, name: str, record: dict, size: int | None) -> str | None:
    """The fault of an object of ``size`` bytes (None: absent) against its marker ``record``."""
    if size is None:
        return f"shard {shard}: {name} object {record['key']} is missing"
    if size != record["nbytes"]:
        return (
            f"shard {shard}: {name} object {record['key']} holds {size} bytes, its marker says "
            f"{record['nbytes']} (truncated or replaced)"
        )
    return None
