"""FeatureLoader: staged and streamed batches, determinism, paired stores, errors, row helpers."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import reseal_marker

from featcache.demo_data import make_demo_dataset
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore
from stitchtrain.data.loader import (
    FeatureLoader,
    Field,
    LoaderStats,
    parse_size,
    split_rows,
    valid_rows,
)

# 18 train images, shards of 4: rows 3, 4, 8 and 14 left out, so shards are partly selected
ROWS = np.array([0, 1, 2, 5, 6, 7, 9, 10, 11, 12, 13, 15, 16, 17])
MODES = {"staged": None, "streamed": 1}  # memory_budget: default (fits) or one byte


def _extract(manifest, out, models, **options):
    config = ExtractConfig(
        models=list(models),
        data=str(manifest),
        out=str(out),
        layers=[2, 4],
        shard_size=4,
        batch_size=4,
        **options,
    )
    plan = plan_extraction(config)
    run_extraction(plan)
    return plan.urls


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    manifest = make_demo_dataset(root / "data", num_classes=3, per_class=8)
    return root, manifest


@pytest.fixture(scope="module")
def paired(data):
    root, manifest = data
    urls = _extract(manifest, root / "paired", ["dinov2-tiny", "clip-tiny"])
    return [FeatureStore.open(url) for url in urls]


@pytest.fixture(scope="module")
def store(paired):
    return paired[0]


def _fields(store):
    return [
        Field("source", store, "layers/2"),
        Field("pooled", store, "pooled"),
        Field("labels", store, "labels"),
        Field("masks", store, "masks"),
    ]


def _loader(store, mode, rows=ROWS, batch_size=4, **options):
    options.setdefault("return_rows", True)
    return FeatureLoader(
        _fields(store),
        rows,
        batch_size,
        memory_budget=MODES[mode],
        prefetch=1,
        shuffle_window=2,
        **options,
    )


def _rows(batches):
    return np.concatenate([b["rows"].numpy() for b in batches])


@pytest.mark.parametrize("mode", MODES)
def test_each_selected_row_once_with_stored_values(store, mode):
    loader = _loader(store, mode)
    assert loader.staged == (mode == "staged")
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 4
    assert [len(b["rows"]) for b in batches] == [4, 4, 4, 2]
    seen = _rows(batches)
    assert sorted(seen) == list(ROWS)
    for batch in batches:
        rows = batch["rows"].numpy()
        assert batch["source"].dtype == batch["pooled"].dtype == torch.float32
        assert batch["labels"].dtype == batch["masks"].dtype == batch["rows"].dtype == torch.int64
        assert batch["source"].shape == (len(rows), *store.group["layers/2"].shape[1:])
        for key, array in (("source", "layers/2"), ("pooled", "pooled"), ("labels", "labels")):
            np.testing.assert_array_equal(batch[key].numpy(), store.read(array, rows))
        np.testing.assert_array_equal(batch["masks"].numpy(), store.read("masks", rows))
    assert loader.stats.batches == 4
    assert loader.stats.bytes_read > 0 and loader.stats.gb_per_s > 0
    assert 0 <= loader.stats.wait_fraction(1.0) < 1


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_per_seed_and_epoch(store, mode):
    first = list(_loader(store, mode).epoch(3))
    again = list(_loader(store, mode).epoch(3))
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])
    assert not np.array_equal(_rows(first), _rows(list(_loader(store, mode).epoch(4))))
    other_seed = _rows(list(_loader(store, mode, seed=1).epoch(3)))
    assert not np.array_equal(_rows(first), other_seed)
    assert not np.array_equal(_rows(first), ROWS)  # shuffled


def test_unshuffled_is_ascending_and_the_same_in_both_modes(store):
    staged = list(_loader(store, "staged", shuffle=False).epoch(0))
    streamed = list(_loader(store, "streamed", shuffle=False).epoch(5))
    np.testing.assert_array_equal(_rows(staged), ROWS)
    for a, b in zip(staged, streamed, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key])


@pytest.mark.parametrize("mode", MODES)
def test_drop_last_and_rows_off(store, mode):
    loader = _loader(store, mode, batch_size=5, drop_last=True, return_rows=False)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 2
    assert all(len(b["labels"]) == 5 and "rows" not in b for b in batches)


@pytest.mark.parametrize("mode", MODES)
def test_paired_stores_give_aligned_rows(paired, mode):
    dino, clip = paired
    assert dino.attrs["encoder"]["name"] != clip.attrs["encoder"]["name"]
    fields = [
        Field("source", dino, "layers/2"),
        Field("target", clip, "layers/4"),
        Field("labels", dino, "labels"),
        Field("target_labels", clip, "labels"),
    ]
    loader = FeatureLoader(
        fields, ROWS, 3, memory_budget=MODES[mode], shuffle_window=1, return_rows=True
    )
    for batch in loader.epoch(1):
        rows = batch["rows"].numpy()
        np.testing.assert_array_equal(batch["source"].numpy(), dino.read("layers/2", rows))
        np.testing.assert_array_equal(batch["target"].numpy(), clip.read("layers/4", rows))
        assert torch.equal(batch["labels"], batch["target_labels"])


def test_construction_errors(store):
    with pytest.raises(ValueError, match="'layers/99'"):
        FeatureLoader([Field("x", store, "layers/99")], ROWS, 4)
    with pytest.raises(ValueError, match="'ids'"):
        FeatureLoader([Field("x", store, "ids")], ROWS, 4)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        FeatureLoader(_fields(store), ROWS, 0)
    with pytest.raises(ValueError, match="rows in 0..17"):
        FeatureLoader(_fields(store), [0, 18], 4)
    with pytest.raises(ValueError, match="distinct keys"):
        FeatureLoader([Field("rows", store, "labels")], ROWS, 4)
    other = FeatureStore.open(store.url)
    other.url = "elsewhere.zarr"
    other.attrs = {**other.attrs, "dataset": {**other.attrs["dataset"], "num_images": 17}}
    with pytest.raises(ValueError, match=f"{store.url}.*elsewhere.zarr"):
        FeatureLoader([Field("a", store, "labels"), Field("b", other, "labels")], ROWS, 4)


def _reader_threads():  # a pool of reader threads: FeatureLoader-reader_0, _1, ...
    return [t for t in threading.enumerate() if t.name.startswith("FeatureLoader-reader")]


def test_reader_thread_errors_surface(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store.url, copy)
    shard = copy / "layers" / "2" / "c" / "1" / "0" / "0"  # rows 4..7
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # inside row 6
    shard.write_bytes(payload)
    broken = FeatureStore.open(str(copy))
    loader = FeatureLoader([Field("source", broken, "layers/2")], ROWS, 2, memory_budget=1)
    with pytest.raises(ValueError, match="checksum"):
        list(loader.epoch(0))
    assert not _reader_threads()


def test_reader_thread_stops_when_the_consumer_breaks_off(store):
    loader = _loader(store, "streamed", batch_size=1)
    for _ in loader.epoch(0):
        break
    assert not _reader_threads()


def test_valid_rows_excludes_unmarked_shards_and_invalid_rows(data, paired):
    root, manifest = data
    np.testing.assert_array_equal(valid_rows(*paired), np.arange(18))
    (url,) = _extract(manifest, root / "half", ["dinov2-tiny"], shard=(0, 2))
    half = FeatureStore.open(url, mode="r+")
    assert half.marked_shards() == {0, 2, 4}
    half.group["valid"][1] = False
    reseal_marker(url, 0)  # as if the writer had skipped row 1
    expected = [0, 2, 3, 8, 9, 10, 11, 16, 17]
    np.testing.assert_array_equal(valid_rows(FeatureStore.open(url)), expected)
    np.testing.assert_array_equal(valid_rows(paired[0], half), expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MB", 512_000_000),
        ("2GiB", 2 * 1024**3),
        ("1.5G", 1_500_000_000),
        ("800k", 800_000),
        ("4096", 4096),
        ("10 KiB", 10240),
        ("3b", 3),
        ("1tb", 10**12),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5MB", "5 XB", "1.2.3G", "iB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match=r"Expected a size .* Got .* instead\."):
        parse_size(text)


def test_split_rows():
    rows = np.arange(100, 150)
    train, val = split_rows(rows, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    assert not set(train) & set(val) and set(train) | set(val) == set(rows)
    assert list(train) == sorted(train) and list(val) == sorted(val)
    again = split_rows(rows[::-1], 0.2, seed=0)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(split_rows(rows, 0.2, seed=1)[1], val)
    assert len(split_rows(rows, 0.0, seed=0)[1]) == 0
    assert len(split_rows(rows[:3], 0.01, seed=0)[1]) == 1
    assert len(split_rows(rows[:1], 0.5, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_rows(rows, 1.0, seed=0)


def test_stats_helpers():
    stats = LoaderStats(bytes_read=2_000_000_000, read_seconds=2.0, wait_seconds=1.0)
    assert stats.gb_per_s == 1.0
    assert stats.wait_fraction(3.0) == 0.25
    assert LoaderStats().gb_per_s == 0.0 and LoaderStats().wait_fraction(0.0) == 0.0
