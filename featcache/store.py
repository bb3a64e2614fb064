"""Feature stores: one Zarr v3 group per (dataset split, encoder fingerprint, extraction settings).

The only module that imports zarr. Layout of a store (format version 1):

  zarr.json                      group; attrs below (deterministic: no timestamps)
  layers/<n>   (image, token, channel)  layer-n tokens, n a plain integer ("layers/6")
  final        (image, token, channel)  the encoder's final norm on layer N (FFM targets)
  pooled       (image, channel)         the encoder's own pooled output
  ids          (image,)  str            dataset ids (image path relative to the data root)
  labels       (image,)  int64          class index (-1: unlabelled)
  valid        (image,)  bool           False for images skipped as unreadable (rows stay NaN)
  masks        (image, y, x) int16      segmentation label maps at the encoder's input size
  markers/shard-<i>.json                written last, one per completed shard (``markers`` is an
                                        empty Zarr group holding the marker files)

Rows follow the dataset's seeded permutation, so row i is the same image in every store of that
dataset split. Feature arrays are float16 (or bfloat16 bits stored as uint16, attr
``logical_dtype``), chunked up to 16 images per inner chunk inside shards of ``shard_size`` images,
Crc32c last in every chunk's codec chain, fill value NaN: a shard that was never written reads
as NaN, and a shard without a marker does not exist for readers. Shards are the unit of writing
and resuming: one writer per shard, marker after all of a shard's arrays.

Attributes (``featcache``): format, format_version, store_id, encoder (``Encoder.describe()``),
dataset (source, split, manifest_hash, classes, order_seed, num_images), layers, tokens,
dtype, logical_dtype, compression, shard_size, num_shards, codecs, tool_version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from featcache.errors import FeatcacheError

__all__ = [
    "FORMAT_VERSION",
    "StoreError",
    "StoreMismatchError",
    "StoreSpec",
    "FeatureStore",
    "find_stores",
]

FORMAT_VERSION = 1
TOKEN_MODES = ("all", "prefix", "pooled")
DTYPES = ("float16", "bfloat16", "float32")


class StoreError(FeatcacheError, OSError):
    """A store that is missing, unreadable, or not a featcache store."""


class StoreMismatchError(StoreError):
    """An existing store was made with a different encoder, dataset or settings."""


@dataclass(frozen=True)
class StoreSpec:
    """Everything that defines a store's contents; its hash is the store id.

    Attributes:
        encoder: ``Encoder.describe()`` (includes the weights+preprocessing fingerprint).
        dataset: source, split, manifest_hash, classes, order_seed, num_images.
        layers: layer numbers stored under ``layers/<n>``.
        tokens: "all" (every token), "prefix" (prefix tokens only) or "pooled" (no layers).
        dtype: float16 | bfloat16 (stored as uint16 bits) | float32.
        compression: "none", "zstd" or "bitround:K" (keep K mantissa bits, then zstd; lossy).
        shard_size: images per shard (the unit of writing and resuming).
        mask_shape: (H, W) of stored masks, or None when the split has no masks.
    """

    encoder: dict[str, Any]
    dataset: dict[str, Any]
    layers: tuple[int, ...]
    tokens: str = "all"
    dtype: str = "float16"
    compression: str = "none"
    shard_size: int = 256
    mask_shape: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"Expected tokens in {TOKEN_MODES}. Got {self.tokens!r} instead.")
        if self.dtype not in DTYPES:
            raise ValueError(f"Expected dtype in {DTYPES}. Got {self.dtype!r} instead.")
        parse_compression(self.compression)
        depth = self.encoder["depth"]
        bad = [n for n in self.layers if not 0 <= n <= depth]
        if bad:
            raise ValueError(
                f"Expected layers in 0..{depth} for {self.encoder['name']}. Got {bad} instead."
            )
        if self.shard_size < 1:
            raise ValueError(f"Expected shard_size >= 1. Got {self.shard_size} instead.")

    @property
    def num_images(self) -> int:
        return int(self.dataset["num_images"])

    def feature_row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every feature array: ``{"layers/6": (T, D), ..., "pooled": (D',)}``.

        T is every token (prefix + patches) for ``tokens="all"``, the prefix tokens only for
        ``"prefix"``; ``"pooled"`` stores no token arrays.
        """
        layout = self.encoder["layout"]
        prefix = len(layout["prefix"])
        tokens = (
            prefix if self.tokens == "prefix" else prefix + layout["grid"][0] * layout["grid"][1]
        )
        width = self.encoder["width"]
        shapes: dict[str, tuple[int, ...]] = {}
        if self.tokens != "pooled":
            shapes.update({f"layers/{n}": (tokens, width) for n in sorted(self.layers)})
            shapes["final"] = (tokens, width)
        shapes["pooled"] = (self.encoder["pooled_width"],)
        return shapes

    @property
    def store_id(self) -> str:
        """Hash of what defines the contents (not of where or when it was written)."""
        identity = {
            "encoder_fingerprint": self.encoder["fingerprint"],
            "encoder_spec": self.encoder["spec"],
            "manifest_hash": self.dataset["manifest_hash"],
            "split": self.dataset["split"],
            "order_seed": self.dataset["order_seed"],
            "layers": sorted(self.layers),
            "tokens": self.tokens,
            "dtype": self.dtype,
            "compression": self.compression,
            "shard_size": self.shard_size,
            "format_version": FORMAT_VERSION,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def parse_compression(text: str) -> tuple[str, int | None]:
    """ "none" | "zstd" | "bitround:K" -> (kind, keepbits)."""
    if text in ("none", "zstd"):
        return text, None
    if text.startswith("bitround:"):
        try:
            keep = int(text.split(":", 1)[1])
        except ValueError:
            keep = -1
        if 1 <= keep <= 10:
            return "bitround", keep
    raise ValueError(
        f"Expected compression 'none', 'zstd' or 'bitround:K' with 1 <= K <= 10 (float16 "
        f"mantissa bits kept). Got {text!r} instead."
    )


def bitround_float16(values: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float16 values to ``keepbits`` mantissa bits (round half to even on the bits)."""
    bits = values.astype(np.float16).view(np.uint16).astype(np.uint32)
    drop = 10 - keepbits
    if drop == 0:
        return values.astype(np.float16)
    half = (1 << (drop - 1)) - 1
    rounded = bits + half + ((bits >> drop) & 1)
    rounded &= ~np.uint32((1 << drop) - 1) & 0xFFFF
    finite = np.isfinite(values)
    out = np.where(finite, rounded.astype(np.uint16), bits.astype(np.uint16))
    return out.view(np.float16)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern as uint16 (round to nearest even), as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# -- storage helpers ----------------------------------------------------------------------------
def _fs_and_path(url: str, storage_options: dict | None = None):
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _zarr_store(url: str, storage_options: dict | None, read_only: bool):
    fs, path = _fs_and_path(url, storage_options)
    if _is_local(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    store = zarr.storage.FsspecStore.from_url(
        url, storage_options=storage_options or None, read_only=read_only
    )
    # fsspec reuses one filesystem instance per protocol and options, with its listings cache:
    # listings from before this store was removed or re-created in this process would hide or
    # invent members (group.arrays()). Every open starts from fresh listings.
    store.fs.invalidate_cache()
    return store


def _codecs(spec: StoreSpec) -> dict[str, Any]:
    kind, _ = parse_compression(spec.compression)
    compressors: list[Any] = [ZstdCodec(level=3)] if kind in ("zstd", "bitround") else []
    return {"serializer": BytesCodec(), "compressors": [*compressors, Crc32cCodec()]}


def _feature_storage_dtype(spec: StoreSpec) -> str:
    return {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}[spec.dtype]


def _feature_fill(spec: StoreSpec):
    # NaN reads back for never-written chunks; for bfloat16 bits, 0x7FC0 is bfloat16 NaN.
    return 0x7FC0 if spec.dtype == "bfloat16" else float("nan")


class FeatureStore:
    """A featcache store on local disk or any fsspec URL.

    Use ``FeatureStore.create(url, spec)`` for writing (creates, or reopens a store with the
    same id and refuses any other), ``FeatureStore.open(url)`` for reading.
    """

    MARKER_DIR = "markers"

    def __init__(self, url: str, group: zarr.Group, storage_options: dict | None = None):
        self.url = url
        self.group = group
        self.storage_options = storage_options
        self.attrs: dict[str, Any] = dict(group.attrs.get("featcache", {}))
        self._fs, self._path = _fs_and_path(url, storage_options)

    # -- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls, url: str, spec: StoreSpec, *, storage_options: dict | None = None
    ) -> FeatureStore:
        """Create the store's metadata, or reopen an existing store made with the same spec.

        Several processes may create one store at once (``--shard I/N``, racing ``extract``
        commands, a crashed creation being redone): they write identical metadata, arrays that
        exist are left alone, and a creator that loses a race (its metadata temp file cleaned
        away by another, see ``remove_metadata_partials``, or the group created between zarr's
        check and write) simply tries again.
        """
        for attempt in range(5):
            try:
                return cls._create_once(url, spec, storage_options)
            except (FileNotFoundError, zarr.errors.ContainsGroupError):
                # lost a race: a temp file cleaned away, or the group appeared between
                # zarr's existence check and its write; the next attempt opens what is there
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _create_once(cls, url: str, spec: StoreSpec, storage_options) -> FeatureStore:
        fs, path = _fs_and_path(url, storage_options)
        if fs.exists(f"{path}/zarr.json"):
            try:
                store = cls.open(url, storage_options=storage_options, mode="r+")
            except StoreError:
                store = None  # metadata half-written by another creator: write it too
            if store is not None:
                store._check_same(spec)
                return store
            cls(
                url,
                zarr.open_group(_zarr_store(url, storage_options, False), mode="a"),
                storage_options,
            ).remove_metadata_partials(older_than_s=0.0)
        group = zarr.open_group(_zarr_store(url, storage_options, False), mode="a")
        create_array = _create_if_absent(group)
        codecs = _codecs(spec)
        n = spec.num_images
        shard = spec.shard_size
        inner = inner_chunk_images(shard)
        feature_kw = dict(
            dtype=_feature_storage_dtype(spec), fill_value=_feature_fill(spec), **codecs
        )
        for name, row_shape in spec.feature_row_shapes().items():
            create_array(
                name,
                shape=(n, *row_shape),
                chunks=(inner, *row_shape),
                shards=(shard, *row_shape),
                dimension_names=("image", "token", "channel")
                if len(row_shape) == 2
                else ("image", "channel"),
                **feature_kw,
            )
        create_array(
            "ids",
            shape=(n,),
            dtype=str,
            chunks=(shard,),
            dimension_names=("image",),
        )
        create_array(
            "labels",
            shape=(n,),
            dtype="int64",
            chunks=(shard,),
            fill_value=-1,
            dimension_names=("image",),
            **codecs,
        )
        create_array(
            "valid",
            shape=(n,),
            dtype="bool",
            chunks=(shard,),
            fill_value=False,
            dimension_names=("image",),
            **codecs,
        )
        if spec.mask_shape is not None:
            height, width_px = spec.mask_shape
            create_array(
                "masks",
                shape=(n, height, width_px),
                dtype="int16",
                chunks=(inner, height, width_px),
                shards=(shard, height, width_px),
                fill_value=-1,
                dimension_names=("image", "y", "x"),
                **codecs,
            )
        if cls.MARKER_DIR not in group:
            # a (sub)group, so zarr and xarray see a known node, not a stray folder
            group.require_group(cls.MARKER_DIR)
        attrs = {
            "format": "featcache-store",
            "format_version": FORMAT_VERSION,
            "store_id": spec.store_id,
            "encoder": spec.encoder,
            "dataset": spec.dataset,
            "layers": sorted(spec.layers),
            "tokens": spec.tokens,
            "dtype": _feature_storage_dtype(spec),
            "logical_dtype": spec.dtype,
            "compression": spec.compression,
            "shard_size": shard,
            "num_shards": -(-n // shard),
            "codecs": ["bytes", *(["zstd"] if spec.compression != "none" else []), "crc32c"],
            "mask_shape": list(spec.mask_shape) if spec.mask_shape else None,
            "tool_version": _tool_version(),
            **spec.extra,
        }
        group.attrs["featcache"] = attrs  # written last: a group without it is not a store
        return cls(url, group, storage_options)

    @classmethod
    def open(
        cls, url: str, *, storage_options: dict | None = None, mode: str = "r"
    ) -> FeatureStore:
        fs, path = _fs_and_path(url, storage_options)
        if not fs.exists(f"{path}/zarr.json"):
            raise StoreError(f"No featcache store at {url!r} (no zarr.json there).")
        try:
            group = zarr.open_group(_zarr_store(url, storage_options, mode == "r"), mode=mode)
        except Exception as err:  # zarr raises several types for unreadable metadata
            raise StoreError(f"Cannot open {url!r} as a Zarr v3 group: {err}") from err
        store = cls(url, group, storage_options)
        if store.attrs.get("format") != "featcache-store":
            raise StoreError(
                f"{url!r} is a Zarr group but not a featcache store (no 'featcache' attrs; "
                "its creation may have been interrupted: remove it and extract again)."
            )
        if store.attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"Expected store format version {FORMAT_VERSION} at {url!r}. "
                f"Got {store.attrs.get('format_version')} instead."
            )
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
        ):
            if self.attrs.get(key) != want:
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

    # -- markers --------------------------------------------------------------------------------
    def _marker_path(self, shard: int) -> str:
        return f"{self._path}/{self.MARKER_DIR}/shard-{shard:06d}.json"

    def marked_shards(self) -> set[int]:
        """Shards whose marker exists and parses: the only shards that exist for readers."""
        try:
            names = self._fs.ls(f"{self._path}/{self.MARKER_DIR}", detail=False, refresh=True)
        except FileNotFoundError:
            return set()
        marked = set()
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("shard-") and base.endswith(".json") and len(base) == 17:
                marker = self.read_marker(int(base[6:12]))
                if marker is not None:
                    marked.add(marker["shard"])
        return marked

    def read_marker(self, shard: int) -> dict | None:
        try:
            marker = json.loads(self._fs.cat_file(self._marker_path(shard)))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if marker.get("shard") != shard or marker.get("store_id") != self.attrs["store_id"]:
            return None
        return marker

    def missing_shards(self) -> list[int]:
        marked = self.marked_shards()
        return [i for i in range(self.num_shards) if i not in marked]

    @property
    def is_complete(self) -> bool:
        return not self.missing_shards()

    def write_marker(self, shard: int, info: dict[str, Any]) -> None:
        """Write the shard's completion marker, atomically (temp + rename on local disk)."""
        marker = {"shard": shard, "store_id": self.attrs["store_id"], **info}
        payload = json.dumps(marker, sort_keys=True).encode()
        path = self._marker_path(shard)
        if _is_local(self._fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.partial"
            with open(tmp, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            self._fs.pipe_file(path, payload)  # object stores: a PUT is atomic

    def remove_partials(self, shards: list[int] | set[int]) -> int:
        """Delete temp files a killed writer left behind for ``shards`` (local stores only).

        Only the given shards' files are touched: this process is their one writer, while other
        processes (``--shard I/N``, Dask workers) may be mid-write on their own shards, and
        deleting their temp files would break their atomic renames. Chunk temp files are
        ``<array>/c/<shard>/...<uuid>.partial``; marker temp files ``markers/shard-<i>.json.*``.
        Returns how many were removed.
        """
        if not _is_local(self._fs):
            return 0
        wanted = set(shards)
        removed = 0
        for directory, _, files in os.walk(self._path):
            for name in files:
                if ".partial" in name and self._partial_shard(directory, name) in wanted:
                    os.remove(os.path.join(directory, name))
                    removed += 1
        return removed

    def _partial_shard(self, directory: str, name: str) -> int | None:
        """The shard a temp file belongs to, or None for metadata temp files."""
        if name.startswith("shard-"):
            return int(name[6:12])
        parts = os.path.relpath(os.path.join(directory, name), self._path).split(os.sep)
        if "c" not in parts[:-1]:
            return None
        index = parts.index("c") + 1
        head = parts[index].split(".")[0]  # the last component carries ".<uuid>.partial"
        return int(head) if head.isdigit() else None

    def remove_metadata_partials(self, older_than_s: float = 60.0) -> int:
        """Delete ``zarr.json`` temp files of a killed creation, if older than ``older_than_s``.

        A creator redoing an unfinished creation passes 0 (a concurrent creator that loses its
        temp file retries, see ``create``); writers of a finished store keep the default, since
        a live metadata write renames its few-kB temp file within milliseconds.
        """
        if not _is_local(self._fs):
            return 0
        removed, now = 0, time.time()
        for directory, _, files in os.walk(self._path):
            for name in files:
                path = os.path.join(directory, name)
                is_metadata = name.startswith("zarr.json.") and name.endswith(".partial")
                if is_metadata and now - os.path.getmtime(path) >= older_than_s:
                    os.remove(path)
                    removed += 1
        return removed

    # -- writing --------------------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> int:
        """Write every array's rows of one shard, then its marker; return feature bytes written.

        ``arrays`` maps array names ("layers/6", "final", "pooled", "ids", "labels", "valid",
        "masks") to numpy arrays of the shard's rows; features arrive as float32 and are cast to
        the store dtype here. A shard is written whole by one writer.
        """
        start, stop = self.shard_rows(shard)
        _, keepbits = parse_compression(self.attrs["compression"])
        feature_names = set(self.feature_arrays())
        written = 0
        for name, values in arrays.items():
            if len(values) != stop - start:
                raise ValueError(
                    f"Shard {shard} of {self.url} holds rows {start}..{stop - 1}: expected "
                    f"{stop - start} rows for {name!r}. Got {len(values)} instead."
                )
            if name in feature_names:
                values = self.encode_features(values, keepbits)
                written += values.nbytes
            if name in feature_names and self._writes_shards_directly():
                self._write_shard_file(name, shard, values)
                continue
            # every chunk is written, NaN rows of skipped images included: zarr then skips
            # comparing each inner chunk with the fill value (~15% of write time), and a
            # resumed run writes what a fresh one does (this is runtime config, not metadata)
            array = self.group[name].with_config({"write_empty_chunks": True})
            array[start:stop] = values
        self.write_marker(shard, info)
        return written

    def _writes_shards_directly(self) -> bool:
        """Uncompressed feature shards are encoded here, byte for byte as zarr would
        (``tests/test_store_format.py``), and written as one file: zarr's own write path
        copies each inner chunk several times and runs at ~0.5 of a memmap write."""
        return self.attrs["compression"] == "none"

    def _write_shard_file(self, name: str, shard: int, values: np.ndarray) -> None:
        """Encode one shard of a feature array (Zarr v3 sharding codec) and write it.

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
        index = np.full((per_shard, 2), 2**64 - 1, dtype="<u8")
        offset = 0
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
            parts += [raw, crc32c.crc32c(raw).to_bytes(4, "little")]
            index[chunk] = (offset, contiguous.nbytes + 4)
            offset += contiguous.nbytes + 4
        index_bytes = index.tobytes()
        parts += [index_bytes, crc32c.crc32c(index_bytes).to_bytes(4, "little")]
        trailing = "/".join(["0"] * len(row_shape))
        path = f"{self._path}/{name}/c/{shard}/{trailing}"
        if _is_local(self._fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.partial"
            try:
                with open(tmp, "wb") as handle:
                    handle.writelines(parts)
                os.replace(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            self._fs.pipe_file(path, b"".join(parts))  # object stores: a PUT is atomic

    def feature_arrays(self) -> list[str]:
        names = [f"layers/{n}" for n in self.layers]
        if self.attrs["tokens"] != "pooled":
            names.append("final")
        return [*names, "pooled"]

    def encode_features(self, values: np.ndarray, keepbits: int | None = None) -> np.ndarray:
        logical = self.attrs["logical_dtype"]
        if logical == "bfloat16":
            return float32_to_bfloat16_bits(values)
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
        """Rows of one array as numpy (features decoded to float32)."""
        values = self.group[name][rows if rows is not None else slice(None)]
        return self.decode_features(values) if name in self.feature_arrays() else values

    def nbytes_stored(self) -> int:
        try:
            return int(self._fs.du(self._path))
        except FileNotFoundError:
            return 0

    def summary(self) -> dict[str, Any]:
        marked = self.marked_shards()
        skipped = []
        for shard in sorted(marked):
            skipped.extend((self.read_marker(shard) or {}).get("skipped", []))
        return {
            "url": self.url,
            "store_id": self.attrs["store_id"],
            "encoder": self.attrs["encoder"]["name"],
            "fingerprint": self.attrs["encoder"]["fingerprint"],
            "dataset": self.attrs["dataset"]["source"],
            "split": self.attrs["dataset"]["split"],
            "layers": self.layers,
            "tokens": self.attrs["tokens"],
            "dtype": self.attrs["logical_dtype"],
            "images": self.num_images,
            "shards_done": len(marked),
            "num_shards": self.num_shards,
            "complete": len(marked) == self.num_shards,
            "skipped": skipped,
            "bytes": self.nbytes_stored(),
        }

    def delete(self) -> None:
        """Remove the whole store."""
        self._fs.rm(self._path, recursive=True)

    # -- verification ---------------------------------------------------------------------------
    def verify(self, expected_fingerprint: str | None = None) -> list[str]:
        """Check markers, checksums, NaN-free valid rows in marked shards; return the faults.

        Every chunk of every marked shard is read, so a Crc32c mismatch (a flipped bit) raises
        inside zarr and is reported with the array and rows; unmarked shards are listed.
        """
        faults = []
        if expected_fingerprint and expected_fingerprint != self.attrs["encoder"]["fingerprint"]:
            faults.append(
                f"encoder fingerprint {self.attrs['encoder']['fingerprint']} differs from "
                f"expected {expected_fingerprint}"
            )
        marked = self.marked_shards()
        for shard in range(self.num_shards):
            if shard not in marked:
                faults.append(f"shard {shard}: no completion marker (incomplete)")
                continue
            start, stop = self.shard_rows(shard)
            try:
                valid = np.asarray(self.group["valid"][start:stop])
                for name in self.feature_arrays():
                    values = self.read(name, slice(start, stop))
                    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1) & valid
                    if bad.any():
                        row = start + int(np.flatnonzero(bad)[0])
                        faults.append(
                            f"shard {shard}: {name} has non-finite values in valid row {row} "
                            f"({int(bad.sum())} rows)"
                        )
                for name in ("ids", "labels") + (("masks",) if "masks" in self.group else ()):
                    self.group[name][start:stop]
            except Exception as err:  # checksum or decode failures surface as various types
                faults.append(f"shard {shard} (rows {start}..{stop - 1}): unreadable: {err}")
        return faults


def _create_if_absent(group: zarr.Group):
    """``group.create_array`` that leaves an existing array alone (never ``overwrite``).

    Two processes creating the same store write identical metadata; overwriting would delete
    chunks the faster one may already have written.
    """
    create = group.create_array

    def create_array(name: str, **kwargs: Any):
        try:
            return create(name, **kwargs)
        except zarr.errors.ContainsArrayError:
            return group[name]

    return create_array


def inner_chunk_images(shard_size: int, most: int = 16) -> int:
    """Images per inner chunk: the largest divisor of ``shard_size`` up to ``most``.

    Zarr costs ~0.1 ms per inner chunk on read and write whatever its size, so one image per
    chunk made whole-shard reads 4-5x slower than the bytes take (benchmarks/); 16 images keep
    a single-image read to 1/16 of a 256-image shard. Shards must be whole multiples.
    """
    return max(d for d in range(1, min(most, shard_size) + 1) if shard_size % d == 0)


def _tool_version() -> str:
    from featcache import __version__

    return __version__


def find_stores(root: str, *, storage_options: dict | None = None) -> list[FeatureStore]:
    """Every featcache store under ``root`` (the root itself, or any depth below it)."""
    fs, path = _fs_and_path(root, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = []
    for meta in sorted(fs.glob(f"{path}/**/zarr.json") + fs.glob(f"{path}/zarr.json")):
        directory = meta.rsplit("/", 1)[0]
        if "/layers" in directory[len(path) :] or directory.endswith(("/final", "/pooled")):
            continue
        url = directory if protocol in ("file", "local") else f"{protocol}://{directory}"
        try:
            found.append(FeatureStore.open(url, storage_options=storage_options))
        except StoreError:
            continue
    unique = {store.url: store for store in found}
    return list(unique.values())
