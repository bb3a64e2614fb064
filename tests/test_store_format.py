"""Feature shards that featcache encodes itself are byte for byte what zarr writes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import fake_store_spec

from featcache.store import FeatureStore, StoreSpec


def _spec(dtype: str, num_images: int, shard_size: int) -> StoreSpec:
    return fake_store_spec(num_images=num_images, dtype=dtype, shard_size=shard_size)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("num_images, shard_size", [(64, 32), (37, 16), (5, 12), (3, 7)])
def test_direct_shard_bytes_equal_zarr(tmp_path, dtype, num_images, shard_size):
    spec = _spec(dtype, num_images, shard_size)
    ours = FeatureStore.create(str(tmp_path / "ours.zarr"), spec)
    rng = np.random.default_rng(0)
    references = {
        name: zarr.create_array(str(tmp_path / "zarr.zarr"), name=name, **_like(ours.group[name]))
        for name in ("layers/1", "final", "pooled")
    }
    for shard in range(ours.num_shards):
        start, stop = ours.shard_rows(shard)
        rows = stop - start
        arrays = {
            "layers/1": rng.standard_normal((rows, 5, 6)).astype(np.float32),
            "final": rng.standard_normal((rows, 5, 6)).astype(np.float32),
            "pooled": rng.standard_normal((rows, 3)).astype(np.float32),
        }
        arrays["layers/1"][0, 0, 0] = np.nan  # a skipped row's NaN survives
        ours.write_shard(shard, {**arrays, **_rows_of(start, stop)}, {})
        for name, values in arrays.items():  # zarr's own write of the same rows
            references[name].with_config({"write_empty_chunks": True})[start:stop] = (
                ours.encode_features(values)
            )
    for name in ("layers/1", "final", "pooled"):
        for shard in range(ours.num_shards):
            trailing = "/0/0" if name != "pooled" else "/0"
            mine = (tmp_path / "ours.zarr" / name / "c" / f"{shard}{trailing}").read_bytes()
            theirs = (tmp_path / "zarr.zarr" / name / "c" / f"{shard}{trailing}").read_bytes()
            assert mine == theirs, (name, shard)
        np.testing.assert_array_equal(
            ours.group[name][...].view(np.uint8),
            zarr.open_array(str(tmp_path / "zarr.zarr"), path=name)[...].view(np.uint8),
        )
    # the trainers' direct reader of these objects gives zarr's values, absent chunks as None
    for name in ("layers/1", "final", "pooled"):
        reference = zarr.open_array(str(tmp_path / "zarr.zarr"), path=name)
        inner = reference.chunks[0]
        assert ours.reads_shard_files(name)
        for shard in range(ours.num_shards):
            start, stop = ours.shard_rows(shard)
            chunks = range(shard_size // inner)
            read = ours.read_shard_chunks(name, shard, chunks, lambda n: np.empty(n, np.uint8))
            for chunk, values, _ in read:
                first = start + chunk * inner
                if first >= stop:
                    assert values is None, (name, shard, chunk)
                    continue
                expected = reference[first : min(first + inner, stop)]
                got = values[: len(expected)]
                np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


def _rows_of(start: int, stop: int) -> dict[str, np.ndarray]:
    """The non-feature arrays of rows start..stop-1."""
    return {
        "ids": np.array([f"image-{row}.jpg" for row in range(start, stop)], dtype=object),
        "labels": np.arange(start, stop, dtype=np.int64),
        "valid": np.ones(stop - start, bool),
    }


def _like(array) -> dict:
    metadata = array.metadata
    return {
        "shape": array.shape,
        "dtype": array.dtype,
        "chunks": array.chunks,
        "shards": array.shards,
        "fill_value": metadata.fill_value,
        "serializer": array.serializer,
        "compressors": array.compressors,
        "dimension_names": metadata.dimension_names,
    }
