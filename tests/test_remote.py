"""featcache extract, resume, verify, ls, info and rm on a real S3-protocol server (moto, loopback).

Mirrors the local-disk tests of test_extract.py: a store written to ``s3://`` must hold exactly
what the same extraction writes to local disk, and every command must work on its URL. The
server and the AWS environment come from the ``s3_bucket`` fixture (conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.demo_data import make_demo_dataset
from featcache.store import FeatureStore

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """24 shape images in 3 classes (18 train, 6 test) with masks; returns the manifest."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=3, per_class=8)


def extract_args(manifest, out, *extra):
    return [
        "extract",
        "--model",
        "dinov2-tiny",
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--layers",
        "1,3,6",
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        *extra,
    ]


def contents(url: str) -> dict[str, object]:
    """Every array of a store, every shard's marker and the store attrs, by name."""
    store = FeatureStore.open(url)
    out: dict[str, object] = {name: array[...] for name, array in store.group.arrays()}
    out.update({f"layers/{n}": array[...] for n, array in store.group["layers"].arrays()})
    out.update({f"marker {i}": store.read_marker(i) for i in range(store.num_shards)})
    out["attrs"] = store.attrs
    return out


def assert_same_contents(remote: dict[str, object], local: dict[str, object]) -> None:
    assert sorted(remote) == sorted(local)
    for name, want in local.items():
        got = remote[name]
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if want.dtype.kind in "fiub":  # compare the bits: NaN rows included
                bits = f"u{want.itemsize}"
                assert np.array_equal(got.view(bits), want.view(bits)), name
            else:
                assert np.array_equal(got, want), name
        else:  # markers (JSON) and attrs
            assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True), name


def remote_objects(url: str) -> dict[str, bytes]:
    """Every object of a remote store by key relative to the store: bitwise comparison."""
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    path = url.removeprefix("s3://")
    return {key[len(path) + 1 :]: fs.cat_file(key) for key in sorted(fs.find(path))}


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, demo) -> dict[str, object]:
    """The same extraction on local disk: its contents and its files' bytes."""
    out = tmp_path_factory.mktemp("local-reference")
    result = runner.invoke(app, extract_args(demo, out))
    assert result.exit_code == 0, result.output
    (store,) = out.glob("*/*.zarr")
    files = {
        str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()
    }
    return {"contents": contents(str(store)), "files": files}


def remote_store(root: str) -> str:
    """The single store under an s3:// root (seen through a fresh listing)."""
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    found = fs.glob(f"{root.removeprefix('s3://')}/*/*.zarr")
    assert len(found) == 1, found
    return f"s3://{found[0]}"


def test_extract_ls_verify_on_s3_equal_local(s3_bucket, demo, local_reference):
    root = f"s3://{s3_bucket}/stores"
    result = runner.invoke(app, extract_args(demo, root))
    assert result.exit_code == 0, result.output
    url = remote_store(root)
    assert url.startswith(f"s3://{s3_bucket}/stores/train/dinov2-tiny-")
    listing = runner.invoke(app, ["ls", root, "--json"])  # a table shortens long paths
    assert listing.exit_code == 0, listing.output
    listed = json.loads(listing.output)
    assert [store["url"] for store in listed["stores"]] == [url] and not listed["damaged"]
    assert listed["stores"][0]["encoder"] == "dinov2-tiny" and listed["stores"][0]["complete"]
    result = runner.invoke(app, ["verify", url])
    assert result.exit_code == 0, result.output
    assert_same_contents(contents(url), local_reference["contents"])
    assert remote_objects(url) == local_reference["files"]  # object for file, byte for byte


def test_resume_on_s3_finishes_missing_shards(s3_bucket, demo, local_reference):
    root = f"s3://{s3_bucket}/stores"
    result = runner.invoke(app, extract_args(demo, root, "--shard", "1/3"))
    assert result.exit_code == 0, result.output
    url = remote_store(root)
    store = FeatureStore.open(url)
    assert store.marked_shards() == {1, 4} and not store.is_complete
    result = runner.invoke(app, ["verify", url])
    assert result.exit_code == 1
    for shard in (0, 2, 3):
        assert f"shard {shard}: no completion marker" in result.output
    assert "shard 1" not in result.output and "shard 4" not in result.output
    result = runner.invoke(app, extract_args(demo, root, "--json"))
    assert result.exit_code == 0, result.output
    assert '"shards_processed": 3' in result.output
    assert FeatureStore.open(url).is_complete
    assert runner.invoke(app, ["verify", url]).exit_code == 0
    assert_same_contents(contents(url), local_reference["contents"])
    assert remote_objects(url) == local_reference["files"]


def test_verify_on_s3_catches_a_flipped_byte(s3_bucket, demo):
    root = f"s3://{s3_bucket}/stores"
    assert runner.invoke(app, extract_args(demo, root)).exit_code == 0
    url = remote_store(root)
    assert runner.invoke(app, ["verify", url]).exit_code == 0
    fs = s3fs.S3FileSystem()
    shard_object = f"{url.removeprefix('s3://')}/layers/3/c/1/0/0"
    data = bytearray(fs.cat_file(shard_object))
    data[100] ^= 0x01
    fs.pipe_file(shard_object, bytes(data))
    result = runner.invoke(app, ["verify", url])
    assert result.exit_code == 1
    assert "shard 1: layers/3 object layers/3/c/1/0/0 does not decode" in result.output
    assert not any(f"shard {i}" in result.output for i in (0, 2, 3, 4))


def test_info_and_rm_on_s3(s3_bucket, demo):
    root = f"s3://{s3_bucket}/stores"
    assert runner.invoke(app, extract_args(demo, root)).exit_code == 0
    url = remote_store(root)
    info = runner.invoke(app, ["info", url, "--json"])
    assert info.exit_code == 0, info.output
    payload = json.loads(info.output)
    assert payload["summary"]["url"] == url and payload["summary"]["complete"] is True
    assert payload["summary"]["bytes"] > 0 and payload["attrs"]["layers"] == [1, 3, 6]
    assert payload["arrays"]["layers/3"] == {"shape": [18, 65, 96], "dtype": "float16"}
    assert {"final", "pooled", "ids", "labels", "valid", "masks"} <= set(payload["arrays"])
    fs = s3fs.S3FileSystem()
    path = url.removeprefix("s3://")
    neighbour = f"{path}-copy/keep.txt"  # shares the store's key prefix: rm must not touch it
    fs.pipe_file(neighbour, b"keep")
    assert len(fs.find(path)) > 10
    result = runner.invoke(app, ["rm", url])
    assert result.exit_code == 0, result.output
    fs.invalidate_cache()
    assert fs.find(path) == []
    assert fs.find(s3_bucket) == [neighbour]  # every object of the store, nothing else
    assert runner.invoke(app, ["info", url]).exit_code == 2  # gone: not a store any more
    assert runner.invoke(app, ["rm", f"s3://{s3_bucket}/stores"]).exit_code == 2  # not a store
    assert fs.find(s3_bucket) == [neighbour]
    # The URL is free again: another extraction there (other layers, --out naming the store)
    # must be what this process's info and verify see, not listings cached before the rm.
    args = extract_args(demo, url)
    args[args.index("--layers") + 1] = "2"
    assert runner.invoke(app, args).exit_code == 0
    info = runner.invoke(app, ["info", url, "--json"])
    assert info.exit_code == 0, info.output
    arrays = json.loads(info.output)["arrays"]
    assert [name for name in arrays if name.startswith("layers/")] == ["layers/2"], arrays
    assert runner.invoke(app, ["verify", url]).exit_code == 0
