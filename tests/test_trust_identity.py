"""Content identity of rows (issue 21, point 1) and store format 3.

Every row records the blake2b digest of the bytes decoded and its files' stamps; a re-run sees
replaced images; stores of different pixels never pair; format-2 stores stay readable."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import extract_demo_stores, fake_store_spec
from dataset_layouts import corpus_images, make_hf_parquet, make_wds, write_class_folder
from typer.testing import CliRunner

import featcache.store.spec as spec_module
from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.datasets import NO_DIGEST, load_dataset
from featcache.store import FeatureStore, StoreMismatchError
from stitchtrain.data.pairing import PairingError, check_pair

runner = CliRunner()


def blake2b16(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def extract(data: Path, out: Path, *extra: str):
    args = ["extract", "--model", "dinov2-tiny", "--data", str(data), "--out", str(out)]
    args += ["--layers", "1", "--shard-size", "4", "--batch-size", "3", "--device", "cpu"]
    return runner.invoke(featcache_app, [*args, *extra])


def only_store(root: Path) -> FeatureStore:
    (store,) = root.glob("*/*.zarr")
    return FeatureStore.open(str(store))


def replace_images(root: Path, seed: int) -> None:
    """Other pixels under the same file names (JPEGs of another size and a later mtime)."""
    write_class_folder(root, corpus_images(6, seed=seed, size=(34, 26)))


def file_digests(store: FeatureStore, root: Path) -> np.ndarray:
    """blake2b of each row's file, in store row order."""
    ids = store.read("ids")
    return np.array([list(blake2b16((root / rid).read_bytes())) for rid in ids], np.uint8)


# -- the digest is blake2b of the bytes decoded --------------------------------------------------
@pytest.mark.parametrize("layout", ["folder", "tar", "parquet"])
def test_row_digest_is_blake2b_of_the_bytes_decoded(tmp_path, layout):
    images = corpus_images(5)
    if layout == "folder":
        data = write_class_folder(tmp_path / "folder", images)
    elif layout == "tar":
        make_wds(tmp_path / "wds", images)
        data = tmp_path / "wds" / "*.tar"
    else:
        data = make_hf_parquet(tmp_path / "hub", images)
    encoded = {data_bytes for _, data_bytes, _ in images}
    records = load_dataset(str(data)).records
    assert len(records) == len(images)
    for record in records:
        loaded = record.load()
        if layout == "folder":
            expected = Path(record.path).read_bytes()
        elif layout == "tar":
            with tarfile.open(record.path) as tar:
                member = record.id.rsplit("/", 1)[1] + ".jpg"
                expected = tar.extractfile(member).read()
        else:
            expected = record.member.read()
        assert expected in encoded  # the image's own encoded bytes, as written
        assert loaded.digest == blake2b16(expected)
        assert loaded.image.size == (30, 22)


# -- replaced images: a re-run sees them ---------------------------------------------------------
def test_replaced_images_are_refused_or_reextracted(tmp_path):
    data = write_class_folder(tmp_path / "data", corpus_images(6, seed=0))
    first = extract(data, tmp_path / "stores")
    assert first.exit_code == 0, first.output
    store = only_store(tmp_path / "stores")
    old_features = store.read("layers/1")

    replace_images(data, seed=1)
    refused = extract(data, tmp_path / "stores")  # default: --on-changed-data error
    assert refused.exit_code == 2, refused.output
    line = " ".join(refused.output.split())
    assert "error:" in line and "Traceback" not in refused.output
    first_row = data / store.read("ids")[0]  # shard 0's first row is checked first
    assert str(first_row) in line and "--on-changed-data reextract" in line
    np.testing.assert_array_equal(only_store(tmp_path / "stores").read("layers/1"), old_features)
    assert store.format_version == 3

    redone = extract(data, tmp_path / "stores", "--on-changed-data", "reextract")
    assert redone.exit_code == 0, redone.output
    fresh = extract(data, tmp_path / "fresh")  # the new images, extracted from scratch
    assert fresh.exit_code == 0, fresh.output
    store, reference = only_store(tmp_path / "stores"), only_store(tmp_path / "fresh")
    np.testing.assert_array_equal(store.read("digests"), file_digests(store, data))
    np.testing.assert_array_equal(store.read("layers/1"), reference.read("layers/1"))
    assert not np.array_equal(store.read("layers/1"), old_features)
    assert store.verify() == []
    again = extract(data, tmp_path / "stores")
    assert again.exit_code == 0 and "complete, nothing to do" in again.output


def test_reextract_unmarks_a_changed_shard_before_rewriting_it(tmp_path, monkeypatch):
    """Crash-safe: when the rewrite of a changed shard fails, that shard is left unmarked."""
    data = write_class_folder(tmp_path / "data", corpus_images(6, seed=0))
    assert extract(data, tmp_path / "stores").exit_code == 0
    replace_images(data, seed=1)

    def crash(self, shard, arrays, info):
        raise OSError("disk gone")

    monkeypatch.setattr(FeatureStore, "write_shard", crash)
    crashed = extract(data, tmp_path / "stores", "--on-changed-data", "reextract")
    assert crashed.exit_code == 2, crashed.output
    assert only_store(tmp_path / "stores").marked_shards() == set()


def test_skipped_rows_have_the_all_zero_digest(tmp_path):
    data = write_class_folder(tmp_path / "data", corpus_images(6, seed=0))
    broken = sorted(data.rglob("*.jpg"))[0]
    broken.write_bytes(b"not an image")
    result = extract(data, tmp_path / "stores", "--on-bad-image", "skip")
    assert result.exit_code == 0, result.output
    store = only_store(tmp_path / "stores")
    ids, valid, digests = store.read("ids"), store.read("valid"), store.read("digests")
    row = list(ids).index(broken.relative_to(data).as_posix())
    assert not valid[row] and bytes(digests[row]) == NO_DIGEST
    assert all(
        bytes(digests[i]) == blake2b16((data / ids[i]).read_bytes()) for i in range(6) if i != row
    )


# -- pairing compares row digests ----------------------------------------------------------------
def test_stores_of_different_pixels_never_pair(tmp_path):
    old = write_class_folder(tmp_path / "old", corpus_images(6, seed=0))
    new = write_class_folder(tmp_path / "new", corpus_images(6, seed=1))
    assert extract(old, tmp_path / "a").exit_code == 0
    assert extract(new, tmp_path / "b").exit_code == 0
    a, b = only_store(tmp_path / "a"), only_store(tmp_path / "b")
    assert a.attrs["dataset"]["manifest_hash"] == b.attrs["dataset"]["manifest_hash"]
    with pytest.raises(PairingError) as caught:
        check_pair(a, b, position=1, stitch="linear", objective="lfm", task="cls")
    message = str(caught.value)
    assert a.url in message and b.url in message and a.read("ids")[0] in message
    args = ["fit", "--source", a.url, "--target", b.url, "--position", "1"]
    args += ["--objective", "lfm", "--out", str(tmp_path / "run"), "--device", "cpu"]
    result = runner.invoke(stitchtrain_app, args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    # the same pixels pair
    same = shutil.copytree(old, tmp_path / "copy")
    assert extract(same, tmp_path / "c").exit_code == 0
    check_pair(
        a, only_store(tmp_path / "c"), position=1, stitch="linear", objective="lfm", task="cls"
    )


# -- format 2 stays readable ---------------------------------------------------------------------
def as_format_2(url: str) -> None:
    """Rewrite a format-3 store as the format-2 writer left it: no ``digests`` array, markers
    without it and without stamps, root attrs of format 2."""
    root = Path(url)
    shutil.rmtree(root / "digests", ignore_errors=True)
    meta = json.loads((root / "zarr.json").read_text())
    attrs = meta["attributes"]["featcache"]
    attrs["format_version"] = 2
    attrs["arrays"] = [name for name in attrs["arrays"] if name != "digests"]
    (root / "zarr.json").write_text(json.dumps(meta))
    for marker_file in (root / "markers").glob("shard-*/zarr.json"):
        marker_meta = json.loads(marker_file.read_text())
        marker = marker_meta["attributes"]["featcache_marker"]
        marker["objects"].pop("digests", None)
        marker.pop("stamps", None)
        marker_file.write_text(json.dumps(marker_meta))


def test_format_2_store_is_read_by_verify_and_fit(tmp_path, caplog):
    stores = extract_demo_stores(
        tmp_path / "data", tmp_path / "stores", models=["dinov2-tiny"], layers=[1, 2], shard_size=8
    )
    for url in stores.values():
        as_format_2(url)
    train = stores["dinov2-tiny", "train"]
    store = FeatureStore.open(train)
    assert store.verify() == [] and "no row digests" in store.notes()[0]
    assert store.format_version == 2 and "digests" not in store.array_names()

    result = runner.invoke(featcache_app, ["verify", train])
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "no row digests" in " ".join(result.output.split())
    as_json = json.loads(runner.invoke(featcache_app, ["verify", train, "--json"]).output)
    assert as_json["ok"] and as_json["faults"] == [] and as_json["notes"]

    args = ["fit", "--source", train, "--target", train, "--position", "1", "--objective", "lfm"]
    args += ["--out", str(tmp_path / "run"), "--device", "cpu", "--epochs", "1", "--lrs", "1e-3"]
    with caplog.at_level(logging.WARNING, logger="stitchtrain.data.pairing"):
        fitted = runner.invoke(stitchtrain_app, args)
    assert fitted.exit_code == 0, fitted.output
    assert (tmp_path / "run" / "metrics.json").exists()
    assert any("compares ids only" in record.getMessage() for record in caplog.records)


def test_format_2_store_is_not_written_into(tmp_path):
    data = write_class_folder(tmp_path / "data", corpus_images(6, seed=0))
    assert extract(data, tmp_path / "stores").exit_code == 0
    as_format_2(only_store(tmp_path / "stores").url)
    spec_url = only_store(tmp_path / "stores").url
    result = extract(data, Path(spec_url))  # --out naming the store itself
    assert result.exit_code == 2, result.output
    assert "format version 2" in " ".join(result.output.split())
    with pytest.raises(StoreMismatchError):
        FeatureStore.create(spec_url, fake_store_spec())


def test_format_version_is_in_the_store_id(monkeypatch):
    spec = fake_store_spec()
    three = spec.store_id
    monkeypatch.setattr(spec_module, "FORMAT_VERSION", 2)
    assert spec.store_id != three
