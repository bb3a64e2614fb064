"""Streamed FeatureLoader batches: the same batches, in the same order, for any number of
reader threads; errors and early exits with several readers.

``expected_rows`` restates the streamed loader's order as it was before parallel readers
(``stitchtrain/data/loader.py`` at that time): a seeded shard permutation, windows of
``shuffle_window`` shards appended to the previous window's remainder, the pool permuted with
the same generator, full batches cut, the remainder carried, the last window emptied.
``PINNED`` holds the rows that implementation yielded for one configuration, so the
restatement itself cannot drift.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import fake_store_spec, reseal_marker

from featcache.store import FeatureStore, StoreSpec
from stitchtrain.data.integrity import NonFiniteFeaturesError, UnreadableShardError
from stitchtrain.data.loader import FeatureLoader, Field

# 6 shards of 18 rows in inner chunks of 9 (featcache.store.inner_chunk_images); the last shard
# holds 5 rows: its first chunk is padded, its second absent
IMAGES, SHARD = 95, 18
# shard 2 (rows 36..53) not selected at all, the others in part
ROWS = np.array([r for r in range(IMAGES) if r % 5 != 3 and not 36 <= r < 54])
WORKERS = (1, 2, 3, 8)


def _spec(name: str, dtype: str, shard_size: int, compression: str) -> StoreSpec:
    return fake_store_spec(
        name=name, fingerprint=name, depth=2, num_images=IMAGES, dtype=dtype,
        compression=compression, shard_size=shard_size, mask_shape=(2, 3),
    )  # fmt: skip


def _write(path, name, dtype, seed, shard_size=SHARD, compression="none") -> FeatureStore:
    """A store whose values depend on the row only (``seed``), whatever its shard size."""
    store = FeatureStore.create(str(path), _spec(name, dtype, shard_size, compression))
    values = _values(seed)
    for shard in range(store.num_shards):
        start, stop = store.shard_rows(shard)
        arrays = {name: value[start:stop] for name, value in values.items()}
        arrays["ids"] = np.array([f"img-{r}" for r in range(start, stop)], dtype=object)
        store.write_shard(shard, arrays, {"rows": [start, stop], "skipped": []})
    return store


def _values(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((IMAGES, 5, 6)).astype(np.float32)
    return {
        "layers/1": tokens,
        "final": tokens * 2 + 1,
        "pooled": tokens[:, 0, :3],
        "labels": np.arange(IMAGES, dtype=np.int64) % 7,
        "valid": np.ones(IMAGES, bool),
        "masks": rng.integers(-1, 5, (IMAGES, 2, 3)).astype(np.int16),
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return _write(root / "a.zarr", "a", "float16", 0), _write(root / "b.zarr", "b", "bfloat16", 1)


@pytest.fixture(scope="module")
def stored(stores):
    """{field key: the whole array as FeatureStore.read decodes it (through zarr)}."""
    return {f.key: f.store.read(f.array) for f in _fields(*stores)}


def _fields(a: FeatureStore, b: FeatureStore) -> list[Field]:
    return [
        Field("source", a, "layers/1"),
        Field("target", b, "final"),
        Field("pooled", a, "pooled"),
        Field("labels", a, "labels"),
        Field("valid", b, "valid"),
        Field("masks", a, "masks"),
    ]


def expected_rows(rows, batch_size, seed, epoch, shuffle=True, window=4, drop_last=False):
    """The streamed batches' store rows, as the single-reader implementation cut them."""
    rows = np.asarray(rows)
    shards = [rows[rows // SHARD == s] for s in np.unique(rows // SHARD)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
    pool, batches = rows[:0], []
    for first in range(0, len(order), window):
        pool = np.concatenate([pool, *(shards[i] for i in order[first : first + window])])
        if shuffle:
            pool = pool[rng.permutation(len(pool))]
        last = first + window >= len(order)
        full = len(pool) if last else len(pool) // batch_size * batch_size
        for start in range(0, full, batch_size):
            stop = min(start + batch_size, full)
            if stop - start < batch_size and drop_last:
                break
            batches.append(pool[start:stop])
        pool = pool[full:]
    return batches


# rows of FeatureLoader(..., ROWS, 5, seed=3, shuffle_window=2, memory_budget=1).epoch(1)
# before parallel readers: recorded from that implementation
PINNED = [
    [32, 29, 30, 21, 27],
    [34, 25, 26, 90, 31],
    [24, 35, 19, 22, 94],
    [55, 61, 71, 62, 65],
    [69, 66, 5, 9, 16],
    [11, 12, 15, 10, 57],
    [6, 60, 54, 70, 2],
    [20, 1, 59, 64, 91],
    [67, 92, 0, 17, 7],
    [85, 79, 56, 86, 84],
    [72, 81, 4, 14, 75],
    [77, 80, 82, 87, 89],
    [74, 76],
]


def _streamed(stores, batch_size, workers, **options):
    options = {"memory_budget": 1, "return_rows": True, "read_workers": workers, **options}
    return FeatureLoader(_fields(*stores), ROWS, batch_size, **options)


def test_pinned_rows_are_the_restated_order():
    got = expected_rows(ROWS, 5, seed=3, epoch=1, window=2)
    assert [list(b) for b in got] == PINNED


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize(
    "batch_size, options",
    [
        (5, dict(seed=3, shuffle_window=2)),
        (4, dict(seed=0)),  # default window 4
        (6, dict(seed=1, shuffle_window=1, prefetch=1)),
        (7, dict(seed=2, shuffle_window=3, drop_last=True)),
        (16, dict(seed=5, shuffle_window=2, prefetch=5)),  # batches span windows
        (5, dict(shuffle=False, shuffle_window=2)),
    ],
)
def test_streamed_batches_equal_the_single_reader_batches(
    stores, stored, workers, batch_size, options
):
    loader = _streamed(stores, batch_size, workers, **options)
    assert not loader.staged
    restated = {k: options[k] for k in ("shuffle", "drop_last") if k in options}
    for epoch in (0, 1):
        expected = expected_rows(
            ROWS,
            batch_size,
            options.get("seed", 0),
            epoch,
            window=options.get("shuffle_window", 4),
            **restated,
        )
        batches = list(loader.epoch(epoch))
        assert len(batches) == len(expected) == len(loader)
        for batch, rows in zip(batches, expected, strict=True):
            np.testing.assert_array_equal(batch["rows"].numpy(), rows)
            assert batch["source"].dtype == batch["target"].dtype == torch.float32
            assert batch["labels"].dtype == batch["masks"].dtype == torch.int64
            assert batch["valid"].dtype == torch.bool
            for key, values in stored.items():
                np.testing.assert_array_equal(batch[key].numpy(), values[rows])
    assert loader.stats.bytes_read > 0 and loader.stats.gb_per_s > 0


@pytest.mark.parametrize("mode", ("staged", "streamed"))
def test_zstd_stores_and_other_shard_sizes_give_the_same_batches(stores, tmp_path, mode):
    """Compressed stores are read through zarr, a target cut in shards of 12 shard by shard:
    the batches are those of the uncompressed pair with equal shards."""
    a, b = stores
    zstd = _write(tmp_path / "z.zarr", "a", "float16", 0, compression="zstd")
    cut = _write(tmp_path / "c.zarr", "b", "bfloat16", 1, shard_size=12)
    budget = {"staged": None, "streamed": 1}[mode]
    options = dict(memory_budget=budget, return_rows=True, read_workers=2, seed=6)
    want = list(FeatureLoader(_fields(a, b), ROWS, 5, **options).epoch(2))
    got = list(FeatureLoader(_fields(zstd, cut), ROWS, 5, **options).epoch(2))
    assert len(got) == len(want)
    for one, two in zip(got, want, strict=True):
        for key in one:
            assert torch.equal(one[key], two[key]), key


def test_batches_do_not_change_when_later_windows_are_read(stores):
    """Each batch is its own memory: reading ahead into reused buffers leaves it intact."""
    loader = _streamed(stores, 3, 3, seed=4, shuffle_window=1, prefetch=1)
    kept = [{k: v.clone() for k, v in batch.items()} for batch in loader.epoch(0)]
    batches = list(loader.epoch(0))
    again = list(loader.epoch(0))  # the same buffers filled once more
    for one, two, three in zip(kept, batches, again, strict=True):
        for key in one:
            assert torch.equal(one[key], two[key]) and torch.equal(one[key], three[key])


def test_read_workers_must_be_positive(stores):
    with pytest.raises(ValueError, match="read_workers >= 1"):
        _streamed(stores, 4, 0)


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("FeatureLoader-reader")]


@pytest.mark.parametrize("workers", (1, 3))
def test_readers_stop_when_the_consumer_breaks_off(stores, workers):
    loader = _streamed(stores, 2, workers, shuffle_window=1)
    for _ in loader.epoch(0):
        break
    assert not _reader_threads()


@pytest.mark.parametrize("workers", (1, 3))
def test_checksum_failure_names_the_shard_with_several_readers(stores, tmp_path, workers):
    a, b = stores
    copy = tmp_path / "a.zarr"
    shutil.copytree(a.url, copy)
    shard = copy / "layers" / "1" / "c" / "4" / "0" / "0"  # rows 72..89
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 3] ^= 0xFF
    shard.write_bytes(payload)
    broken = FeatureStore.open(str(copy))
    loader = _streamed((broken, b), 4, workers, shuffle_window=1)
    with pytest.raises(UnreadableShardError) as info:
        list(loader.epoch(0))
    message = str(info.value)
    assert str(copy) in message and "layers/1" in message and "shard 4 (rows 72..89)" in message
    assert "\n" not in message
    assert not _reader_threads()


@pytest.mark.parametrize("workers", (1, 3))
def test_nan_in_a_selected_row_is_named_with_several_readers(stores, tmp_path, workers):
    import zarr

    a, b = stores
    copy = tmp_path / "a.zarr"
    shutil.copytree(a.url, copy)
    values = zarr.open_array(str(copy / "layers" / "1"), mode="r+")
    values[26] = np.nan  # selected (26 % 5 != 3)
    values[28] = np.nan  # not selected: ignored
    reseal_marker(str(copy), 1)  # NaN as the writer wrote it: the marker vouches for it
    loader = _streamed((FeatureStore.open(str(copy)), b), 4, workers, shuffle_window=2)
    with pytest.raises(NonFiniteFeaturesError, match=r"layers/1, rows 26 instead"):
        list(loader.epoch(0))
    assert not _reader_threads()
