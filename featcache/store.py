"""Feature stores: one Zarr v3 group per (dataset split, encoder fingerprint, extraction settings).

The only module (with ``featcache.storage``, where its bytes go) that imports zarr. Layout of a
store, format version 2 (``docs/design.md`` has the full contract):

  zarr.json                      group; attrs below (deterministic: no timestamps)
  layers/<n>   (image, token, channel)  layer-n tokens, n a plain integer ("layers/6")
  final        (image, token, channel)  the encoder's final norm on layer N (FFM targets)
  pooled       (image, channel)         the encoder's own pooled output
  ids          (image, byte)  uint8     dataset ids (image path relative to the data root),
                                        UTF-8, NUL-padded to the longest id of the split
  labels       (image,)  int64          class index (-1: unlabelled)
  valid        (image,)  bool           False for images skipped as unreadable (rows stay NaN)
  masks        (image, y, x) int16      segmentation label maps at the encoder's input size
  markers/shard-<i>/zarr.json           a Zarr group per completed shard, written last; its
                                        attribute ``featcache_marker`` is the marker

Every array uses only core Zarr v3 data types and codecs (bytes, zstd, crc32c, sharding), so
independent readers (TensorStore, zarr-python, xarray) read every array. Crc32c is last in every
chunk's codec chain. Rows follow the dataset's seeded permutation, so row i is the same image in
every store of that dataset split. Feature arrays are float16 (or bfloat16 bits stored as uint16,
array attribute ``logical_dtype``), up to 16 images per inner chunk inside shards of
``shard_size`` images, fill value NaN. Every other array has one chunk per shard. So each array
holds exactly one object per shard, ``<array>/c/<shard>/0...``, and that is what a marker
proves: for every array, the object's key, size and digest: ``zlib.crc32`` of the object's
chunk checksums (a shard: its index, then the Crc32c trailer of each of its chunks; a chunk:
its trailer), see ``object_digest``. With zarr's own Crc32c of every chunk (checked as
``verify`` decodes), that pins every byte, at the cost of reading a few bytes per chunk: no
pass over the data at write time.

A shard without a valid marker does not exist for readers; resuming = planned shards minus
marked shards; ``verify`` re-reads every object of every marked shard against its marker.

Store creation writes a claim first (the root ``zarr.json`` with attrs ``{"featcache": {...,
"state": "creating"}}``), then the arrays, then the full attrs (no ``state``). A directory that
holds anything else, or a Zarr group without a featcache claim, is never adopted.

Attributes (``featcache``): format, format_version, store_id, encoder (``Encoder.describe()``),
dataset (source, split, manifest_hash, classes, order_seed, num_images), layers, tokens,
dtype, logical_dtype, compression, shard_size, num_shards, id_width, codecs, arrays,
mask_shape, precision, tool_version; after the first batch is measured, precision_error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from featcache.errors import FeatcacheError
from featcache.storage import (
    fs_and_path,
    is_local,
    remove_stale_partials,
    sync_files,
    write_atomic,
    zarr_store,
)

__all__ = [
    "FORMAT_VERSION",
    "StoreError",
    "StoreMismatchError",
    "StoreSpec",
    "FeatureStore",
    "find_stores",
    "remove_store",
]

FORMAT_VERSION = 2
TOKEN_MODES = ("all", "prefix", "pooled")
DTYPES = ("float16", "bfloat16", "float32")
PRECISIONS = ("fp32", "bf16", "fp16")  # featcache.encoders.PRECISIONS (zarr-only module here)
MARKER_ATTR = "featcache_marker"
_ABSENT_CHUNK = 2**64 - 1  # a sharding index entry (offset and size) of a chunk never written
_STORE_NAMES = ("zarr.json", "layers", "final", "pooled", "ids", "labels", "valid", "masks")


class StoreError(FeatcacheError, OSError):
    """A store that is missing, unreadable, damaged, or not a featcache store."""


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
        id_width: bytes of the longest UTF-8 id of the split (the ``ids`` row width).
        precision: what the encoder computed in: "fp32", or "bf16" / "fp16" autocast
            (``featcache.encoders.PRECISIONS``); it changes the numbers, so it enters the id.
    """

    encoder: dict[str, Any]
    dataset: dict[str, Any]
    layers: tuple[int, ...]
    tokens: str = "all"
    dtype: str = "float16"
    compression: str = "none"
    shard_size: int = 256
    mask_shape: tuple[int, int] | None = None
    id_width: int = 64
    precision: str = "fp32"
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
        if self.id_width < 1:
            raise ValueError(f"Expected id_width >= 1. Got {self.id_width} instead.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Expected precision in {PRECISIONS}. Got {self.precision!r} instead.")

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
        if self.precision != "fp32":  # stores made before the option were fp32: same ids
            identity["precision"] = self.precision
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


def encode_ids(ids, width: int) -> np.ndarray:
    """Strings -> ``(n, width)`` uint8 rows: UTF-8, NUL-padded; refuses ids over ``width``."""
    encoded = [str(value).encode("utf-8") for value in ids]
    longest = max((len(value) for value in encoded), default=0)
    if longest > width:
        raise ValueError(f"Expected ids of at most {width} UTF-8 bytes. Got {longest} instead.")
    if any(b"\0" in value for value in encoded):
        raise ValueError("Expected ids without NUL characters (NUL pads the ids array).")
    fixed = np.array(encoded, dtype=f"S{width}")
    return fixed.view(np.uint8).reshape(len(encoded), width)


def decode_ids(rows: np.ndarray) -> np.ndarray:
    """``(n, width)`` uint8 rows -> object array of str (the inverse of ``encode_ids``)."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    fixed = rows.view(f"S{rows.shape[1]}").reshape(len(rows))  # numpy strips trailing NULs
    return np.array([value.decode("utf-8") for value in fixed.tolist()], dtype=object)


# -- storage helpers ----------------------------------------------------------------------------
def _codecs(spec: StoreSpec) -> dict[str, Any]:
    kind, _ = parse_compression(spec.compression)
    compressors: list[Any] = [ZstdCodec(level=3)] if kind in ("zstd", "bitround") else []
    return {"serializer": BytesCodec(), "compressors": [*compressors, Crc32cCodec()]}


def _feature_storage_dtype(spec: StoreSpec) -> str:
    return {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}[spec.dtype]


def _feature_fill(spec: StoreSpec):
    # NaN reads back for never-written chunks; for bfloat16 bits, 0x7FC0 is bfloat16 NaN.
    return 0x7FC0 if spec.dtype == "bfloat16" else float("nan")


def _read_json(fs, path: str) -> tuple[dict | None, str | None]:
    """(parsed JSON object, None) or (None, why it could not be read); missing -> (None, None)."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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
        self._fs, self._path = fs_and_path(url, storage_options)

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
        """
        for attempt in range(5):
            try:
                return cls._create_once(url, spec, storage_options)
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

    @classmethod
    def open(
        cls, url: str, *, storage_options: dict | None = None, mode: str = "r"
    ) -> FeatureStore:
        """Open a complete-metadata featcache store of this format; else ``StoreError``."""
        fs, path = fs_and_path(url, storage_options)
        claim = _root_claim(fs, path, url)
        if claim is None:
            raise StoreError(f"No featcache store at {url!r} (no zarr.json there).")
        version = claim.get("format_version")
        if claim.get("format") != "featcache-store" or version != FORMAT_VERSION:
            raise StoreError(
                f"Expected a featcache store of format version {FORMAT_VERSION} at {url!r}. Got "
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
        return cls(url, group, storage_options)

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

    # -- markers --------------------------------------------------------------------------------
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
                    meta = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    problem = f"marker is not valid JSON ({err})"
            elif raw is not None:
                problem = f"marker unreadable ({raw})"
            why = self._marker_problem(shard, meta if isinstance(meta, dict) else None, problem)
            result[shard] = (None, why) if why else (meta["attributes"][MARKER_ATTR], None)
        return result

    def valid_markers(self) -> dict[int, dict]:
        """{shard: its marker} of the shards whose marker is valid for this store (one listing
        and one read of every marker): the only shards that exist for readers."""
        return {s: marker for s, (marker, _) in self._markers().items() if marker is not None}

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

    def update_attrs(self, extra: dict[str, Any]) -> None:
        """Add measured facts (``precision_error``) to a created store's ``featcache`` attrs;
        the keys that define the store (everything in its id) are refused."""
        identity = ("store_id", "encoder", "dataset", "layers", "tokens", "dtype",
                    "logical_dtype", "compression", "shard_size", "precision")  # fmt: skip
        fixed = set(extra) & set(identity)
        if fixed:
            raise ValueError(f"Expected attrs outside the store's identity. Got {sorted(fixed)}.")
        self.attrs = {**self.attrs, **extra}
        self.group.attrs["featcache"] = self.attrs

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

    def remove_stale_partials(self, shards: Iterable[int] | None = None) -> int:
        """Delete temp files of writers that are gone (``featcache.storage``) from the store's
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

    # -- writing --------------------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> int:
        """Write every array's rows of one shard, then its marker; return feature bytes written.

        ``arrays`` maps every array name of the store ("layers/6", "final", "pooled", "ids",
        "labels", "valid", "masks") to numpy arrays of the shard's rows; features arrive as
        float32 (or float16) and are cast to the store dtype here, ids as strings. A shard is
        written whole by one writer. The marker records, per array, the object's key, size and
        Crc32c of the bytes written, so it proves exactly this shard's objects.
        """
        start, stop = self.shard_rows(shard)
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
        if is_local(self._fs):  # the data on disk before the marker that vouches for it
            sync_files(f"{self._path}/{record['key']}" for record in objects.values())
        self.write_marker(shard, {**info, "objects": objects})
        return written

    def _object_record(self, name: str, shard: int) -> dict:
        """{key, nbytes, digest} of array ``name``'s object of ``shard``, read back as written."""
        key = self.object_key(name, shard)
        data = self._fs.cat_file(f"{self._path}/{key}")
        return {"key": key, "nbytes": len(data), "digest": self.object_digest(name, data)}

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
        array = self.group[name]
        if array.shards is None:
            return zlib.crc32(data[-4:])
        chunks = array.shards[0] // array.chunks[0]
        index = data[-(16 * chunks + 4) :]
        if len(index) != 16 * chunks + 4:
            raise ValueError(f"{len(data)} bytes cannot hold the index of {chunks} chunks")
        entries = np.frombuffer(index[:-4], dtype="<u8").reshape(chunks, 2)
        trailers = [
            data[end - 4 : end]
            for offset, nbytes in entries.tolist()
            if offset != _ABSENT_CHUNK
            for end in [offset + nbytes]
        ]
        return zlib.crc32(b"".join([index, *trailers]))

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

        The index is read first and checked against its Crc32c, then each chunk in offset order,
        each byte once, and checked against its Crc32c, as zarr's decode does. A short or
        malformed object raises ``ValueError`` naming the chunk; a missing one, ``OSError``.
        """
        import crc32c

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
        digest = zlib.crc32(b"".join([index_bytes, index_checksum, *trailers]))
        parts += [index_bytes, index_checksum]
        key = self.object_key(name, shard)
        path = f"{self._path}/{key}"
        if is_local(self._fs):
            write_atomic(path, parts)
        else:
            self._fs.pipe_file(path, b"".join(parts))  # object stores: a PUT is atomic
        return {"key": key, "nbytes": offset + len(index_bytes) + 4, "digest": digest}

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
        """Rows of one array as numpy: features decoded to float32, ids as str objects."""
        values = self.group[name][rows if rows is not None else slice(None)]
        if name == "ids":
            return decode_ids(values)
        return self.decode_features(values) if name in self.feature_arrays() else values

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

    # -- verification ---------------------------------------------------------------------------
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
        for shard, (marker, problem) in sorted(self._markers().items()):
            if marker is None:
                faults.append(f"shard {shard}: {problem}")
                continue
            shard_faults = []
            for name in self.array_names():
                record, key = marker["objects"][name], self.object_key(name, shard)
                if record.get("key") != key:
                    shard_faults.append(
                        f"shard {shard}: {name}: marker names object {record.get('key')}, "
                        f"expected {key}"
                    )
                    continue
                try:
                    data = self._fs.cat_file(f"{self._path}/{key}")
                except FileNotFoundError:
                    data = None
                fault = _size_fault(shard, name, record, None if data is None else len(data))
                if fault:
                    shard_faults.append(fault)
                elif self._digest_or_none(name, data) != record["digest"]:
                    shard_faults.append(
                        f"shard {shard}: {name} object {key} differs from its marker's digest "
                        "(corrupted, replaced or swapped with another shard's)"
                    )
            faults += shard_faults or self._decode_faults(shard)
        return faults

    def _digest_or_none(self, name: str, data: bytes) -> int | None:
        try:
            return self.object_digest(name, data)
        except ValueError:
            return None

    def _decode_faults(self, shard: int) -> list[str]:
        """Decode every array of ``shard`` through zarr (each chunk against its Crc32c); valid
        rows must hold finite features. One fault per array that fails, naming it."""
        start, stop = self.shard_rows(shard)
        faults, values = [], {}
        for name in self.array_names():
            try:
                values[name] = self.read(name, slice(start, stop))
            except Exception as err:  # checksum or decode failures surface as various types
                reason = " ".join(f"{type(err).__name__}: {err}".split())
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


def _metadata_dirs(path: str, arrays: list[str]) -> set[str]:
    """Folders holding the store's ``zarr.json`` documents (root, groups, arrays)."""
    return {path, f"{path}/layers", f"{path}/{FeatureStore.MARKER_DIR}"} | {
        f"{path}/{name}" for name in arrays
    }


def _array_names(spec: StoreSpec) -> list[str]:
    names = [*spec.feature_row_shapes(), "ids", "labels", "valid"]
    return names + (["masks"] if spec.mask_shape is not None else [])


def _create_arrays(group: zarr.Group, spec: StoreSpec) -> None:
    """Create every array of ``spec`` that does not exist yet (never ``overwrite``: two
    processes creating one store write identical metadata, and overwriting would delete chunks
    the faster one may already have written)."""

    def create(name: str, codecs: dict[str, Any], **kwargs: Any) -> None:
        with contextlib.suppress(zarr.errors.ContainsArrayError):
            group.create_array(name, **codecs, **kwargs)

    codecs = _codecs(spec)
    n, shard = spec.num_images, spec.shard_size
    inner = inner_chunk_images(shard)
    storage_dtype = _feature_storage_dtype(spec)
    for name, row_shape in spec.feature_row_shapes().items():
        create(
            name,
            codecs,
            shape=(n, *row_shape),
            dtype=storage_dtype,
            fill_value=_feature_fill(spec),
            chunks=(inner, *row_shape),
            shards=(shard, *row_shape),
            dimension_names=("image", "token", "channel")
            if len(row_shape) == 2
            else ("image", "pooled_channel"),
            attributes={"logical_dtype": spec.dtype, "storage_dtype": storage_dtype},
        )
    # ids compress well whatever the store's compression (paths share long prefixes)
    ids_codecs = {"serializer": BytesCodec(), "compressors": [ZstdCodec(level=3), Crc32cCodec()]}
    create(
        "ids",
        ids_codecs,
        shape=(n, spec.id_width),
        dtype="uint8",
        fill_value=0,
        chunks=(shard, spec.id_width),
        dimension_names=("image", "byte"),
        attributes={"logical_dtype": "utf-8 string, NUL-padded to the row width"},
    )
    create(
        "labels",
        codecs,
        shape=(n,),
        dtype="int64",
        chunks=(shard,),
        fill_value=-1,
        dimension_names=("image",),
    )
    create(
        "valid",
        codecs,
        shape=(n,),
        dtype="bool",
        chunks=(shard,),
        fill_value=False,
        dimension_names=("image",),
    )
    if spec.mask_shape is not None:
        height, width_px = spec.mask_shape
        create(
            "masks",
            codecs,
            shape=(n, height, width_px),
            dtype="int16",
            chunks=(inner, height, width_px),
            shards=(shard, height, width_px),
            fill_value=-1,
            dimension_names=("image", "y", "x"),
        )


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


NON_ROOT_NAMES = tuple(f"/{name}" for name in _STORE_NAMES[1:])
