"""Feature stores: one Zarr v3 group per (dataset split, encoder fingerprint, extraction settings).

The only package that imports zarr. Layout of a store, format version 3 (``docs/design.md`` has
the full contract; format 2 stores, without ``digests`` and stamps, are read, never written):

  zarr.json                      group; attrs below (deterministic: no timestamps)
  layers/<n>   (image, token, channel)  layer-n tokens, n a plain integer ("layers/6")
  final        (image, token, channel)  the encoder's final norm on layer N (FFM targets)
  pooled       (image, channel)         the encoder's own pooled output
  ids          (image, byte)  uint8     dataset ids (image path relative to the data root),
                                        UTF-8, NUL-padded to the longest id of the split
  labels       (image,)  int64          class index (-1: unlabelled)
  valid        (image,)  bool           False for images skipped as unreadable (rows stay NaN)
  digests      (image, 16)  uint8       blake2b of the bytes decoded (0: not read; format 3)
  masks        (image, y, x) int16      segmentation label maps at the encoder's input size
  markers/shard-<i>/zarr.json           a Zarr group per completed shard, written last; its
                                        attribute ``featcache_marker`` is the marker; it
                                        holds each row's file stamps (size, mtime_ns)

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
marked shards; every read proves the marked shards it touches against their markers (size and
digest, once per array and shard per open store: ``proof``); ``verify`` re-reads every object of
every marked shard against its marker.

Store creation writes a claim first (the root ``zarr.json`` with attrs ``{"featcache": {...,
"state": "creating"}}``), then the arrays, then the full attrs (no ``state``). A directory that
holds anything else, or a Zarr group without a featcache claim, is never adopted.

Attributes (``featcache``): format, format_version, store_id, encoder (``Encoder.describe()``),
dataset (source, split, manifest_hash, classes, order_seed, num_images), layers, tokens,
dtype, logical_dtype, compression, shard_size, num_shards, id_width, codecs, arrays,
mask_shape, precision, tool_version; after the first batch is measured, precision_error.

Modules: ``spec`` (``StoreSpec``, what defines a store and its id), ``codec`` (value encodings:
compression, bitround, bfloat16 bits, ids), ``layout`` (the arrays and their codecs),
``claims`` (what a path holds before it is adopted), ``markers`` (shard completion markers),
``shard_files`` (uncompressed shard files written and read directly, object digests),
``proof`` (every read proves its shard against the marker), ``consistency`` (what opening
checks: the attributes against each other and every array's metadata), ``verify`` (faults of
marked shards), ``feature_store`` (``FeatureStore``), ``catalog``
(finding stores, damaged ones named, and removing stores), ``storage`` (fsspec URLs, atomic
writes, temp files), ``errors``.
"""

from featcache.store.catalog import DamagedStore, find_stores, remove_store, scan_stores
from featcache.store.codec import (
    bfloat16_bits_to_float32,
    bitround_float16,
    decode_ids,
    encode_ids,
    float32_to_bfloat16_bits,
    parse_compression,
)
from featcache.store.errors import (
    ShardProofError,
    StoreError,
    StoreMismatchError,
    UnreadableShardError,
)
from featcache.store.feature_store import FeatureStore
from featcache.store.layout import inner_chunk_images
from featcache.store.spec import (
    DIGEST_BYTES,
    DTYPES,
    FORMAT_VERSION,
    PRECISIONS,
    READABLE_FORMAT_VERSIONS,
    TOKEN_MODES,
    StoreSpec,
)
from featcache.store.storage import TEMP_SUFFIX, remove_stale_partials, write_atomic

__all__ = [
    "DIGEST_BYTES",
    "DTYPES",
    "FORMAT_VERSION",
    "PRECISIONS",
    "READABLE_FORMAT_VERSIONS",
    "TEMP_SUFFIX",
    "TOKEN_MODES",
    "DamagedStore",
    "FeatureStore",
    "ShardProofError",
    "StoreError",
    "StoreMismatchError",
    "StoreSpec",
    "UnreadableShardError",
    "bfloat16_bits_to_float32",
    "bitround_float16",
    "decode_ids",
    "encode_ids",
    "find_stores",
    "float32_to_bfloat16_bits",
    "inner_chunk_images",
    "parse_compression",
    "remove_stale_partials",
    "remove_store",
    "scan_stores",
    "write_atomic",
]
