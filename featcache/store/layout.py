"""The arrays of a store and how zarr holds them: names, shapes, chunks and shards, dtypes, fill
values and codec chains (the format in ``featcache.store``'s docstring)."""

from __future__ import annotations

import contextlib
from typing import Any

import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from featcache.store.codec import parse_compression
from featcache.store.spec import DIGEST_BYTES, StoreSpec

_STORE_NAMES = (
    "zarr.json", "layers", "final", "pooled", "ids", "labels", "valid", "digests", "masks"
)  # fmt: skip
NON_ROOT_NAMES = tuple(f"/{name}" for name in _STORE_NAMES[1:])


def _codecs(spec: StoreSpec) -> dict[str, Any]:
    kind, _ = parse_compression(spec.compression)
    compressors: list[Any] = [ZstdCodec(level=3)] if kind in ("zstd", "bitround") else []
    return {"serializer": BytesCodec(), "compressors": [*compressors, Crc32cCodec()]}


def _feature_storage_dtype(spec: StoreSpec) -> str:
    return {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}[spec.dtype]


def _feature_fill(spec: StoreSpec):
    # NaN reads back for never-written chunks; for bfloat16 bits, 0x7FC0 is bfloat16 NaN.
    return 0x7FC0 if spec.dtype == "bfloat16" else float("nan")


def _array_names(spec: StoreSpec) -> list[str]:
    names = [*spec.feature_row_shapes(), "ids", "labels", "valid", "digests"]
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
    create(  # each row's content identity: blake2b of the bytes decoded (format 3)
        "digests",
        codecs,
        shape=(n, DIGEST_BYTES),
        dtype="uint8",
        chunks=(shard, DIGEST_BYTES),
        fill_value=0,
        dimension_names=("image", "digest_byte"),
        attributes={"logical_dtype": f"blake2b digest, {DIGEST_BYTES} bytes; 0: not read"},
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
