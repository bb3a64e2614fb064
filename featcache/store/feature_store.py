"""``FeatureStore``: creating, opening and checking a store's settings, its geometry (shards and
rows), writing a shard and reading arrays. Markers, shard files, the read-time proof of shards
and verification are mixed in from ``featcache.store.markers``, ``shard_files``, ``proof`` and
``verify``."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from featcache.store.claims import _check_not_file, _foreign_entries, _root_claim
from featcache.store.codec import (
    bfloat16_bits_to_float32,
    bitround_float16,
    decode_ids,
    encode_ids,
    float32_to_bfloat16_bits,
    parse_compression,
)
from featcache.store.consistency import check_consistency
from featcache.store.errors import StoreError, StoreMismatchError, UnreadableShardError
from featcache.store.layout import _array_names, _create_arrays, _feature_storage_dtype
from featcache.store.markers import ShardMarkers, _metadata_dirs
from featcache.store.proof import ShardProof
from featcache.store.shard_files import ShardFiles
from featcache.store.spec import (
    DIGEST_BYTES,
    FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    StoreSpec,
)
from featcache.store.storage import (
    existing_ancestor,
    fs_and_path,
    is_local,
    remove_stale_partials,
    sync_files,
    zarr_store,
)
from featcache.store.verify import StoreVerification


class FeatureStore(ShardMarkers, ShardFiles, ShardProof, StoreVerification):
    """A featcache store on local disk or any fsspec URL.

    Use ``FeatureStore.create(url, spec)`` for writing (creates, or reopens a store with the
    same id and refuses any other), ``FeatureStore.open(url)`` for reading.
    """

    def __init__(self, url: str, group: zarr.Group, storage_options: dict | None = None):
        self.url = url
        self.group = group
        self.storage_options = storage_options
        self.attrs: dict[str, Any] = dict(group.attrs.get("featcache", {}))
        self._fs, self._path = fs_and_path(url, storage_options)
        self._proven: set[tuple[str, int]] = set()  # (array, shard) proven by a read
        self._read_markers: dict[int, dict] | None = None  # valid_markers as last read

    # -- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls, url: str, spec: StoreSpec, *, storage_options: dict | None = None
    ) -> FeatureStore:
        """Create the store, resume an interrupted creation of the same spec, or reopen it.

        Several processes may create one store at once (``--shard I/N``, racing ``extract``
        commands, a crashed creation being redone): they write identical metadata, arrays that
        exist are left alone, and a creator that loses a race (the group created between
        zarr's check and its write) tries again. Refused: a file, a non-empty directory that is
        not a featcache store, a foreign Zarr group, a store of another spec or format. An
        ``OSError`` (a full disk) becomes a ``StoreError``; the store then holds no markers.

        Locally, the store's metadata is durable on return, before any marker can be written:
        every ``zarr.json``, then every folder from theirs up to the one above the first folder
        that did not exist (``_sync_metadata``), also when reopening (another creator's
        metadata may not have reached the disk yet).
        """
        fs, path = fs_and_path(url, storage_options)
        top = existing_ancestor(path) if is_local(fs) else None
        for attempt in range(5):
            try:
                store = cls._create_once(url, spec, storage_options)
                if top is not None:
                    store._sync_metadata(top)
                return store
            except zarr.errors.ContainsGroupError:
                if attempt == 4:
                    raise StoreError(
                        f"Could not create {url!r}: other creators keep racing."
                    ) from None
            except StoreError:
                raise
            except OSError as err:
                raise StoreError(
                    f"Creating store {url!r} failed: {err}. No shard of it is marked; free the "
                    "space or fix the cause and re-run the same command."
                ) from err
        raise AssertionError("unreachable")

    @classmethod
    def _create_once(cls, url: str, spec: StoreSpec, storage_options) -> FeatureStore:
        fs, path = fs_and_path(url, storage_options)
        _check_not_file(fs, path, url)
        claim = _root_claim(fs, path, url)
        if claim is None:
            foreign = _foreign_entries(fs, path)
            if foreign:
                raise StoreError(
                    f"Expected a new or empty directory for a store at {url!r}. Got one that "
                    f"holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} "
                    "instead; choose another --out."
                )
        elif claim.get("state") != "creating":
            store = cls.open(url, storage_options=storage_options, mode="r+")
            if store.format_version != FORMAT_VERSION:
                raise StoreMismatchError(
                    f"Expected a store of format version {FORMAT_VERSION} at {url!r} to write "
                    f"into. Got format version {store.format_version} (read only: it has no "
                    "row digests) instead. Use another --out, or remove it (featcache rm) and "
                    "extract it again."
                )
            store._check_same(spec)
            return store
        elif claim.get("store_id") != spec.store_id:
            raise StoreMismatchError(
                f"Store {url!r} is being created with other settings (store id "
                f"{claim.get('store_id')}, requested {spec.store_id}). Use another --out."
            )
        if is_local(fs):
            remove_stale_partials(_metadata_dirs(path, _array_names(spec)))
        base = {"format": "featcache-store", "format_version": FORMAT_VERSION}
        group = zarr.open_group(
            zarr_store(url, storage_options, False),
            mode="a",
            attributes={"featcache": {**base, "store_id": spec.store_id, "state": "creating"}},
        )
        _create_arrays(group, spec)
        group.require_group(cls.MARKER_DIR)
        attrs = {
            **base,
            "store_id": spec.store_id,
            "encoder": spec.encoder,
            "dataset": spec.dataset,
            "layers": sorted(spec.layers),
            "tokens": spec.tokens,
            "dtype": _feature_storage_dtype(spec),
            "logical_dtype": spec.dtype,
            "compression": spec.compression,
            "shard_size": spec.shard_size,
            "num_shards": -(-spec.num_images // spec.shard_size),
            "id_width": spec.id_width,
            "codecs": ["bytes", *(["zstd"] if spec.compression != "none" else []), "crc32c"],
            "arrays": _array_names(spec),
            "mask_shape": list(spec.mask_shape) if spec.mask_shape else None,
            "precision": spec.precision,
            "tool_version": _tool_version(),
            **spec.extra,
        }
        group.attrs["featcache"] = attrs  # written last: until then the store is a claim
        return cls(url, group, storage_options)

    def _sync_metadata(self, top: str) -> None:
        """fsync every ``zarr.json`` of the local store, then every folder from theirs up to
        ``top`` (the folder above the store's first new folder) inclusive."""
        documents = [
            f"{folder}/zarr.json"
            for folder in sorted(_metadata_dirs(self._path, self.array_names()))
        ]
        sync_files((d for d in documents if self._fs.exists(d)), top)

    @classmethod
    def open(
        cls, url: str, *, storage_options: dict | None = None, mode: str = "r"
    ) -> FeatureStore:
        """Open a complete-metadata featcache store of a readable format (``READABLE_FORMAT_
        VERSIONS``: 3, and 2, which has no row digests); else ``StoreError``, also for metadata
        that contradicts itself (``featcache.store.consistency``)."""
        fs, path = fs_and_path(url, storage_options)
        claim = _root_claim(fs, path, url)
        if claim is None:
            raise StoreError(f"No featcache store at {url!r} (no zarr.json there).")
        version = claim.get("format_version")
        if claim.get("format") != "featcache-store" or version not in READABLE_FORMAT_VERSIONS:
            readable = " or ".join(map(str, READABLE_FORMAT_VERSIONS))
            raise StoreError(
                f"Expected a featcache store of format version {readable} at {url!r}. Got "
                f"format version {version} instead: this featcache cannot read it. Remove it "
                "(featcache rm) and extract it again."
            )
        if claim.get("state") == "creating":
            raise StoreError(
                f"The store at {url!r} was never fully created (its creation was interrupted). "
                "Re-run the extraction that makes it, or remove it (featcache rm)."
            )
        try:
            group = zarr.open_group(zarr_store(url, storage_options, mode == "r"), mode=mode)
        except Exception as err:  # zarr raises several types for unreadable metadata
            raise StoreError(f"Cannot open {url!r} as a Zarr v3 group: {err}") from err
        store = cls(url, group, storage_options)
        check_consistency(url, group, store.attrs)  # every array's metadata, the attributes
        return store

    def _check_same(self, spec: StoreSpec) -> None:
        if self.attrs.get("store_id") == spec.store_id:
            return
        ours, theirs = self.attrs.get("encoder", {}), spec.encoder
        differences = []
        if ours.get("fingerprint") != theirs["fingerprint"]:
            differences.append(
                f"encoder fingerprint {ours.get('fingerprint')} (store, {ours.get('name')}) vs "
                f"{theirs['fingerprint']} (requested, {theirs['name']})"
            )
        for key, want in (
            ("layers", sorted(spec.layers)),
            ("tokens", spec.tokens),
            ("compression", spec.compression),
            ("shard_size", spec.shard_size),
            ("logical_dtype", spec.dtype),
            ("precision", spec.precision),
        ):
            if self.attrs.get(key, "fp32" if key == "precision" else None) != want:
                differences.append(f"{key} {self.attrs.get(key)} (store) vs {want} (requested)")
        dataset = self.attrs.get("dataset", {})
        if dataset.get("manifest_hash") != spec.dataset["manifest_hash"]:
            differences.append(
                f"dataset manifest hash {dataset.get('manifest_hash')} (store) vs "
                f"{spec.dataset['manifest_hash']} (requested)"
            )
        detail = "; ".join(differences) or "store id differs"
        raise StoreMismatchError(
            f"Store {self.url!r} was made with different settings: {detail}. Use another --out "
            "or remove the store (featcache rm) to re-extract."
        )

    # -- geometry -------------------------------------------------------------------------------
    @property
    def format_version(self) -> int:
        """The store's format version: 3, or 2 (no ``digests`` array, no file stamps)."""
        return int(self.attrs["format_version"])

    @property
    def num_images(self) -> int:
        return int(self.attrs["dataset"]["num_images"])

    @property
    def shard_size(self) -> int:
        return int(self.attrs["shard_size"])

    @property
    def num_shards(self) -> int:
        return int(self.attrs["num_shards"])

    @property
    def layers(self) -> list[int]:
        return list(self.attrs["layers"]) if self.attrs["tokens"] != "pooled" else []

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def feature_arrays(self) -> list[str]:
        names = [f"layers/{n}" for n in self.layers]
        if self.attrs["tokens"] != "pooled":
            names.append("final")
        return [*names, "pooled"]

    def array_names(self) -> list[str]:
        """Every array of the store, each holding one object per shard."""
        return list(self.attrs["arrays"])

    def object_key(self, name: str, shard: int) -> str:
        """Key (relative to the store) of array ``name``'s one object for ``shard``."""
        return f"{name}/c/{shard}" + "/0" * (self.group[name].ndim - 1)

    def update_attrs(self, extra: dict[str, Any]) -> None:
        """Add measured facts (``precision_error``) to a created store's ``featcache`` attrs;
        the keys that define the store (everything in its id) are refused. Locally the root
        ``zarr.json`` is fsynced, then the store's folder: durable on return."""
        identity = ("store_id", "encoder", "dataset", "layers", "tokens", "dtype",
                    "logical_dtype", "compression", "shard_size", "precision")  # fmt: skip
        fixed = set(extra) & set(identity)
        if fixed:
            raise ValueError(f"Expected attrs outside the store's identity. Got {sorted(fixed)}.")
        self.attrs = {**self.attrs, **extra}
        self.group.attrs["featcache"] = self.attrs
        if is_local(self._fs):
            sync_files([f"{self._path}/zarr.json"], self._path)

    # -- writing --------------------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> int:
        """Write every array's rows of one shard, then its marker; return feature bytes written.

        ``arrays`` maps every array name of the store ("layers/6", "final", "pooled", "ids",
        "labels", "valid", "digests", "masks") to numpy arrays of the shard's rows; features
        arrive as float32 (or float16) and are cast to the store dtype here, ids as strings.
        Without "digests" (rows made from arrays, not read from images) every row's digest is
        16 zero bytes, the digest of a row whose content is not known. A shard is
        written whole by one writer. The marker records, per array, the object's key, size and
        Crc32c of the bytes written, so it proves exactly this shard's objects.
        """
        start, stop = self.shard_rows(shard)
        if "digests" in self.array_names() and "digests" not in arrays:
            arrays = {**arrays, "digests": np.zeros((stop - start, DIGEST_BYTES), np.uint8)}
        missing = sorted(set(self.array_names()) - set(arrays))
        unknown = sorted(set(arrays) - set(self.array_names()))
        if missing or unknown:
            raise ValueError(
                f"Expected rows for every array of {self.url} ({', '.join(self.array_names())}). "
                f"Got {missing} missing and {unknown} unknown instead."
            )
        _, keepbits = parse_compression(self.attrs["compression"])
        feature_names = set(self.feature_arrays())
        written, objects = 0, {}
        for name, values in arrays.items():
            if len(values) != stop - start:
                raise ValueError(
                    f"Shard {shard} of {self.url} holds rows {start}..{stop - 1}: expected "
                    f"{stop - start} rows for {name!r}. Got {len(values)} instead."
                )
            if name == "ids":
                values = encode_ids(values, int(self.attrs["id_width"]))
            if name in feature_names:
                values = self.encode_features(values, keepbits)
                written += values.nbytes
            if name in feature_names and self._writes_shards_directly():
                objects[name] = self._write_shard_file(name, shard, values)
                continue
            # every chunk is written, NaN rows of skipped images included: zarr then skips
            # comparing each inner chunk with the fill value (~15% of write time), and a
            # resumed run writes what a fresh one does (this is runtime config, not metadata)
            array = self.group[name].with_config({"write_empty_chunks": True})
            array[start:stop] = values
            objects[name] = self._object_record(name, shard)
        if is_local(self._fs):  # the data and its folders on disk before the marker
            sync_files((f"{self._path}/{r['key']}" for r in objects.values()), self._path)
        self.write_marker(shard, {**info, "objects": objects})
        return written

    def _object_record(self, name: str, shard: int) -> dict:
        """{key, nbytes, digest} of array ``name``'s object of ``shard``, read back as written."""
        key = self.object_key(name, shard)
        data = self._fs.cat_file(f"{self._path}/{key}")
        return {"key": key, "nbytes": len(data), "digest": self.object_digest(name, data)}

    def encode_features(self, values: np.ndarray, keepbits: int | None = None) -> np.ndarray:
        logical = self.attrs["logical_dtype"]
        if logical == "bfloat16":  # uint16 rows are bfloat16 bits already (cast on the device)
            return values if values.dtype == np.uint16 else float32_to_bfloat16_bits(values)
        if logical == "float32":
            return values.astype(np.float32, copy=False)
        half = values.astype(np.float16, copy=False)
        return bitround_float16(half, keepbits) if keepbits else half

    def decode_features(self, values: np.ndarray) -> np.ndarray:
        """Stored values -> float32 (bfloat16 bits are widened; float16 cast)."""
        if self.attrs["logical_dtype"] == "bfloat16":
            return bfloat16_bits_to_float32(values)
        return values.astype(np.float32)

    # -- reading --------------------------------------------------------------------------------
    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows of one array as numpy: features decoded to float32, ids as str objects
        (``read_stored``: proven, and a chunk that does not decode names its shard)."""
        values = self.read_stored(name, rows)
        if name == "ids":
            return decode_ids(values)
        return self.decode_features(values) if name in self.feature_arrays() else values

    def read_stored(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows of one array as stored (storage dtype), through zarr. Every marked shard they
        touch is proven first (``ShardProofError``; ``featcache.store.proof``); a chunk that
        does not decode (fails its Crc32c) raises ``UnreadableShardError`` naming its shard.
        Rows of unmarked shards read as the fill value."""
        selection = rows if rows is not None else slice(None)
        shards = self.shards_of(selection)
        self.prove(name, shards)
        try:
            return self.group[name][selection]
        except Exception:  # zarr's decode faults surface as several types
            for shard in shards:  # the failure path only: which shard fails on its own
                start, stop = self.shard_rows(shard)
                try:
                    self.group[name][start:stop]
                except Exception as cause:
                    rows_of = (start, stop)
                    raise UnreadableShardError(self.url, name, shard, rows_of, cause) from cause
            raise

    def nbytes_stored(self) -> int:
        try:
            return int(self._fs.du(self._path))
        except FileNotFoundError:
            return 0

    def summary(self) -> dict[str, Any]:
        markers = self._markers()
        marked = sorted(shard for shard, (marker, _) in markers.items() if marker is not None)
        skipped = [item for shard in marked for item in markers[shard][0].get("skipped", [])]
        return {
            "url": self.url,
            "store_id": self.attrs["store_id"],
            "encoder": self.attrs["encoder"]["name"],
            # what users read: a hybrid's label (``stitched:DIR`` is a path), else the name
            "label": (self.attrs["encoder"].get("hybrid") or {}).get("label")
            or self.attrs["encoder"]["name"],
            "fingerprint": self.attrs["encoder"]["fingerprint"],
            "dataset": self.attrs["dataset"]["source"],
            "split": self.attrs["dataset"]["split"],
            "layers": self.layers,
            "tokens": self.attrs["tokens"],
            "dtype": self.attrs["logical_dtype"],
            "precision": self.attrs.get("precision", "fp32"),
            "precision_error": self.attrs.get("precision_error"),
            "images": self.num_images,
            "shards_done": len(marked),
            "num_shards": self.num_shards,
            "complete": len(marked) == self.num_shards,
            "skipped": skipped,
            "bytes": self.nbytes_stored(),
        }


def _tool_version() -> str:
    from featcache.version import __version__

    return __version__
