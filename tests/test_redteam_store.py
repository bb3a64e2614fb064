"""Red team: store format 2. Damage a store every way the red-team report found, and require
``verify`` (and every reader) to notice, naming the array and shard; independent readers read
every array; writers and ``rm`` never touch what is not theirs.

Stores here are written through ``FeatureStore`` with a fake encoder description (no model is
loaded), except where the CLI itself is under test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import fake_store_spec
from typer.testing import CliRunner

import featcache.store.storage as storage
from cli.featcache_app import app
from featcache.store import FeatureStore, StoreError, StoreSpec, remove_store

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _spec(
    *,
    dtype="float16",
    compression="none",
    num_images=10,
    shard_size=4,
    masks=True,
    manifest="h",
) -> StoreSpec:
    return fake_store_spec(
        num_images=num_images, classes=["a", "b"], manifest_hash=manifest, layers=(1, 3),
        dtype=dtype, compression=compression, shard_size=shard_size,
        mask_shape=(4, 5) if masks else None, id_width=24,
    )  # fmt: skip


def make_store(path: Path, seed: int = 0, **kw) -> FeatureStore:
    """A complete store of random rows (ids with non-ASCII characters, labels, masks)."""
    store = FeatureStore.create(str(path), _spec(**kw))
    rng = np.random.default_rng(seed)
    for shard in range(store.num_shards):
        start, stop = store.shard_rows(shard)
        rows = stop - start
        arrays = {
            name: rng.standard_normal((rows, *store.group[name].shape[1:])).astype(np.float32)
            for name in store.feature_arrays()
        }
        arrays["ids"] = np.array([f"klasse-ä/{row:04d}.jpg" for row in range(start, stop)])
        arrays["labels"] = np.arange(start, stop, dtype=np.int64) % 2
        arrays["valid"] = np.ones(rows, bool)
        if "masks" in store.array_names():
            arrays["masks"] = rng.integers(0, 3, (rows, 4, 5)).astype(np.int16)
        store.write_shard(shard, arrays, {"rows": [start, stop], "skipped": []})
    return FeatureStore.open(str(path))


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    made = make_store(tmp_path / "s.zarr")
    assert made.is_complete and made.verify() == []
    return made


def _object(store: FeatureStore, name: str, shard: int) -> Path:
    return Path(store.url) / store.object_key(name, shard)


def _faults_of(store: FeatureStore) -> list[str]:
    return FeatureStore.open(store.url).verify()


# -- every array covered and checked ------------------------------------------------------------
@pytest.mark.parametrize("name", ["ids", "labels", "valid", "masks", "layers/1", "final", "pooled"])
def test_verify_names_a_deleted_object(store, name):
    _object(store, name, 1).unlink()
    faults = _faults_of(store)
    assert faults == [f"shard 1: {name} object {store.object_key(name, 1)} is missing"]
    assert f"shard 1: {name} object" in store.object_faults()[0]  # the cheap check sees it too


def test_verify_names_a_deleted_valid_and_feature_object(store):
    _object(store, "valid", 2).unlink()
    _object(store, "layers/3", 2).unlink()
    faults = _faults_of(store)
    assert len(faults) == 2 and all(f.startswith("shard 2: ") for f in faults)
    assert any("valid" in f for f in faults) and any("layers/3" in f for f in faults)


def test_verify_catches_swapped_feature_shards(store):
    first, second = _object(store, "final", 0), _object(store, "final", 1)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    assert store.group["final"][0:4].shape == (4, 5, 6)  # zarr itself reads them happily
    faults = _faults_of(store)
    assert len(faults) == 2
    assert all("final" in f and "differs from its marker's digest" in f for f in faults)


@pytest.mark.parametrize("name", ["layers/1", "ids", "masks"])
def test_verify_catches_a_truncated_object(store, name):
    path = _object(store, name, 0)
    path.write_bytes(path.read_bytes()[:-7])
    (fault,) = _faults_of(store)
    assert fault.startswith(f"shard 0: {name} object") and "truncated" in fault
    assert "truncated" in store.object_faults([name])[0]


def test_verify_catches_a_marker_of_another_store(tmp_path, store):
    other = make_store(tmp_path / "other.zarr", manifest="another dataset")
    marker = Path(store.url) / "markers" / "shard-000001" / "zarr.json"
    shutil.copy(Path(other.url) / "markers" / "shard-000001" / "zarr.json", marker)
    assert FeatureStore.open(store.url).marked_shards() == {0, 2}
    (fault,) = _faults_of(store)
    assert fault.startswith("shard 1: marker belongs to another store")


def test_verify_catches_a_marker_of_a_same_spec_store_with_other_bytes(tmp_path, store):
    """Same settings, other image contents: same store id, but the digests differ."""
    twin = make_store(tmp_path / "twin.zarr", seed=1)
    assert twin.attrs["store_id"] == store.attrs["store_id"]
    for name in ("final", "markers/shard-000000"):
        target = Path(store.url) / name
        shutil.rmtree(target)
        shutil.copytree(Path(twin.url) / name, target)
    shutil.copy(Path(store.url) / "markers" / "shard-000001" / "zarr.json", tmp_path / "keep")
    faults = _faults_of(store)
    # final of shards 1, 2 now differ from their markers; shard 0's marker is the twin's and
    # its final matches, but every other array of shard 0 does not
    assert any(f.startswith("shard 1: final") for f in faults)
    assert any(f.startswith("shard 0: layers/1") for f in faults)


def test_verify_catches_a_marker_moved_to_another_shard(store):
    markers = Path(store.url) / "markers"
    shutil.rmtree(markers / "shard-000002")
    shutil.copytree(markers / "shard-000001", markers / "shard-000002")
    (fault,) = _faults_of(store)
    assert fault == "shard 2: marker is that of shard 1"


def test_verify_names_an_unmarked_shard(store):
    shutil.rmtree(Path(store.url) / "markers" / "shard-000001")
    assert _faults_of(store) == ["shard 1: no completion marker (incomplete)"]


def test_verify_json_on_a_corrupt_root_metadata_exits_1_with_json(store):
    (Path(store.url) / "zarr.json").write_text("{ not json")
    result = runner.invoke(app, ["verify", store.url, "--json"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and "zarr.json" in payload["faults"][0]


def test_format_1_store_is_refused_with_advice(store):
    group = zarr.open_group(store.url, mode="r+")
    group.attrs["featcache"] = {**group.attrs["featcache"], "format_version": 1}
    with pytest.raises(StoreError, match="format version 1.*extract it again"):
        FeatureStore.open(store.url)
    remove_store(store.url)  # and rm still removes it
    assert not Path(store.url).exists()


# -- independent readers ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, compression",
    [
        ("float16", "none"),
        ("bfloat16", "none"),
        ("float32", "none"),
        ("float16", "zstd"),
        ("float16", "bitround:4"),
    ],
)
def test_tensorstore_reads_every_array_bit_identically(tmp_path, dtype, compression):
    import tensorstore as ts  # a test extra: an independent Zarr v3 implementation

    made = make_store(tmp_path / "s.zarr", dtype=dtype, compression=compression, num_images=11)
    assert made.num_images % made.shard_size  # a partial last shard
    for name in made.array_names():
        opened = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{made.url}/{name}"}}
        ).result()
        theirs = opened.read().result()
        ours = made.group[name][...]
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, name
        assert theirs.tobytes() == ours.tobytes(), name
    ids = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{made.url}/ids"}}
    ).result()
    raw = ids.read().result()
    assert bytes(raw[3]).rstrip(b"\0").decode() == made.read("ids")[3] == "klasse-ä/0003.jpg"


def test_arrays_carry_their_logical_dtype(tmp_path):
    xarray = pytest.importorskip("xarray")
    made = make_store(tmp_path / "s.zarr", dtype="bfloat16")
    assert made.group["final"].attrs["logical_dtype"] == "bfloat16"
    dataset = xarray.open_zarr(made.url, consolidated=False)
    assert dataset["pooled"].attrs["logical_dtype"] == "bfloat16"
    assert str(dataset["pooled"].dtype) == "uint16"


def test_walking_the_group_with_plain_zarr_warns_about_nothing(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(store.url, mode="r").members(max_depth=None))
    assert "markers/shard-000000" in members and "layers/3" in members


def test_ids_longer_than_the_row_width_are_refused(tmp_path):
    made = FeatureStore.create(str(tmp_path / "s.zarr"), _spec(num_images=4))
    arrays = {n: np.zeros((4, *made.group[n].shape[1:]), np.float32) for n in made.feature_arrays()}
    arrays.update(ids=np.array(["x" * 25] * 4), labels=np.zeros(4, np.int64))
    arrays.update(valid=np.ones(4, bool), masks=np.zeros((4, 4, 5), np.int16))
    with pytest.raises(ValueError, match="at most 24 UTF-8 bytes"):
        made.write_shard(0, arrays, {})
    assert made.marked_shards() == set()


# -- writers and temp files ---------------------------------------------------------------------
_SLOW_MARKER_WRITER = """
import os, sys, time
import featcache.store.storage as storage
from featcache.store import FeatureStore
real = os.replace
def slow(source, target):
    print("renaming", flush=True)
    time.sleep(1.0)
    return real(source, target)
storage.os.replace = slow
FeatureStore.open(sys.argv[1], mode="r+").write_marker(0, {"objects": {}, "rows": [0, 4]})
"""


def test_cleanup_leaves_a_live_writers_temp_files_alone(store):
    """A second writer's cleanup during the first one's slow rename (1 s, like network
    storage) must not delete the first one's marker temp file."""
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SLOW_MARKER_WRITER), store.url],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "renaming"
    temps = list(Path(store.url).rglob("*.partial"))
    assert len(temps) == 1 and f".fc-{writer.pid}-" in temps[0].name
    assert store.remove_stale_partials() == 0  # the other writer, cleaning up meanwhile
    _, stderr = writer.communicate(timeout=60)
    assert writer.returncode == 0, stderr
    assert not list(Path(store.url).rglob("*.partial"))


def test_cleanup_removes_temp_files_of_dead_writers_and_old_zarr_ones(store):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    chunk_dir = Path(store.url) / "final" / "c" / "1" / "0"
    dead = chunk_dir / f"0.fc-{gone.pid}-{storage._HOST}-3.partial"
    other_host = chunk_dir / f"0.fc-{gone.pid}-00000000-3.partial"
    zarr_old = Path(store.url) / "labels" / "c" / f"1.{'a' * 32}.partial"
    zarr_new = Path(store.url) / f"zarr.{'b' * 32}.partial"
    unknown = Path(store.url) / "notes.partial"
    for path in (dead, other_host, zarr_old, zarr_new, unknown):
        path.write_bytes(b"half")
    hour_ago = time.time() - 3600
    os.utime(zarr_old, (hour_ago, hour_ago))
    assert store.remove_stale_partials() == 2
    assert not dead.exists() and not zarr_old.exists()
    assert other_host.exists() and zarr_new.exists() and unknown.exists()
    assert store.verify() == []


def test_zarr_writes_through_featcache_name_their_writer(tmp_path, monkeypatch):
    seen = []
    real = storage.os.replace
    monkeypatch.setattr(storage.os, "replace", lambda a, b: (seen.append(a), real(a, b))[1])
    make_store(tmp_path / "s.zarr", compression="zstd")  # every array through zarr
    assert seen and all(f".fc-{os.getpid()}-" in name for name in seen)
    assert any(name.endswith(".partial") and "/labels/c/" in name for name in seen)


def test_disk_full_during_creation_is_a_store_error(tmp_path, monkeypatch):
    def full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", full)
    with pytest.raises(StoreError, match="Creating store .* No space left on device"):
        FeatureStore.create(str(tmp_path / "s.zarr"), _spec())
    monkeypatch.undo()
    with pytest.raises(StoreError):
        FeatureStore.open(str(tmp_path / "s.zarr"))  # nothing readable was left behind
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
    assert make_store(tmp_path / "s.zarr").verify() == []  # the same command then completes


# -- the store directory ------------------------------------------------------------------------
def test_create_refuses_a_non_empty_directory_that_is_not_a_store(tmp_path):
    target = tmp_path / "mine.zarr"
    target.mkdir()
    (target / "important.txt").write_text("thesis")
    with pytest.raises(StoreError, match="holds important.txt"):
        FeatureStore.create(str(target), _spec())
    assert sorted(p.name for p in target.iterdir()) == ["important.txt"]


def test_create_refuses_a_foreign_zarr_group(tmp_path):
    target = tmp_path / "theirs.zarr"
    zarr.create_array(str(target), name="weights", shape=(3,), dtype="f4")[:] = 1.0
    with pytest.raises(StoreError, match="featcache did not create"):
        FeatureStore.create(str(target), _spec())
    with pytest.raises(StoreError, match="featcache did not create"):
        remove_store(str(target))
    assert zarr.open_array(str(target / "weights"))[...].tolist() == [1.0, 1.0, 1.0]


def test_create_refuses_a_file(tmp_path):
    target = tmp_path / "store.zarr"
    target.write_text("not a directory")
    with pytest.raises(StoreError, match="existing file"):
        FeatureStore.create(str(target), _spec())
    assert target.read_text() == "not a directory"


def test_rm_refuses_a_store_holding_a_users_file(store):
    (Path(store.url) / "important.txt").write_text("thesis")
    result = runner.invoke(app, ["rm", store.url])
    assert result.exit_code == 2 and "important.txt" in result.output
    assert "Traceback" not in result.output
    assert (Path(store.url) / "important.txt").read_text() == "thesis"
    assert FeatureStore.open(store.url).verify() == []


@pytest.mark.parametrize("what", ["plain directory", "missing path", "file"])
def test_rm_refuses_what_is_not_a_store(tmp_path, what):
    target = tmp_path / "thing"
    if what == "plain directory":
        target.mkdir()
        (target / "a.txt").write_text("x")
    elif what == "file":
        target.write_text("x")
    result = runner.invoke(app, ["rm", str(target)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(target) in result.output
    assert target.exists() == (what != "missing path")


def test_rm_removes_an_interrupted_creation(tmp_path, store):
    group = zarr.open_group(store.url, mode="r+")
    group.attrs["featcache"] = {**group.attrs["featcache"], "state": "creating"}
    assert runner.invoke(app, ["rm", store.url]).exit_code == 0
    assert not Path(store.url).exists()


@pytest.mark.parametrize("what", ["a users directory", "a foreign zarr group"])
def test_extract_refuses_an_out_it_did_not_make(tmp_path, what):
    from featcache.demo_data import make_demo_dataset

    manifest = make_demo_dataset(tmp_path / "demo", num_classes=2, per_class=2)
    target = tmp_path / "mine.zarr"
    if what == "a users directory":
        target.mkdir()
        (target / "important.txt").write_text("thesis")
    else:
        zarr.create_array(str(target), name="weights", shape=(3,), dtype="f4")[:] = 1.0
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest), "--out", str(target)]
    result = runner.invoke(app, [*args, "--layers", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(target) in result.output and "another --out" in result.output
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    assert runner.invoke(app, ["rm", str(target)]).exit_code == 2
    assert target.exists()


def test_extract_reports_a_full_disk_during_creation_in_one_line(tmp_path, monkeypatch):
    from featcache.demo_data import make_demo_dataset

    manifest = make_demo_dataset(tmp_path / "demo", num_classes=2, per_class=2)
    real = storage.os.replace

    def full(source, target):
        if str(target).endswith("zarr.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(storage.os, "replace", full)
    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest), "--layers", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "stores")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "No space left on device" in result.output and "re-run" in result.output
    monkeypatch.undo()
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "stores")]).exit_code == 0


@pytest.mark.parametrize("name", ["layers/1", "ids", "labels", "masks"])
def test_verify_names_a_flipped_bit_inside_a_chunk(store, name):
    path = _object(store, name, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside a chunk's bytes: size and trailers unchanged
    path.write_bytes(bytes(data))
    faults = _faults_of(store)
    assert len(faults) == 1 and faults[0].startswith(f"shard 1: {name} object "), faults
    assert "does not decode" in faults[0] or "differs from its marker" in faults[0]


def test_marker_digest_does_not_read_the_data(store):
    """The digest covers the index and chunk checksums (zarr checks each chunk against its
    own): equal-size shards of other contents get other digests."""
    digests = {store.read_marker(s)["objects"]["final"]["digest"] for s in range(2)}
    assert len(digests) == 2
    data = _object(store, "final", 0).read_bytes()
    assert store.object_digest("final", data) == store.read_marker(0)["objects"]["final"]["digest"]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_shards_data_reaches_the_disk_before_its_marker(tmp_path, monkeypatch, compression):
    """Every object file of a shard and its folder are fsynced before the shard's marker is
    (written to its temp file, fsynced, renamed): after a machine crash a marker never names
    data that is not on disk. Both write paths: direct shard files and zarr's own."""
    synced: list[str] = []
    fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = make_store(tmp_path / "s.zarr", compression=compression)
    for shard in range(store.num_shards):
        marker = store._marker_path(shard)
        (marker_at,) = [i for i, p in enumerate(synced) if p.startswith(marker)]  # its temp
        objects = store.read_marker(shard)["objects"]
        assert len(objects) == len(store.array_names())
        for record in objects.values():
            path = os.path.realpath(f"{store.url}/{record['key']}")
            assert path in synced[:marker_at], (shard, record["key"])
            assert os.path.dirname(path) in synced[:marker_at], (shard, record["key"])


def test_checking_a_store_for_training_reads_its_markers_once(store, monkeypatch):
    """``check_usable`` (fit, probe, transfer) reads every marker once (one listing and one
    read of each marker object: on S3, requests), and uses that one reading throughout."""
    from stitchtrain.data.integrity import check_usable

    reads = []
    markers = FeatureStore._markers
    monkeypatch.setattr(FeatureStore, "_markers", lambda self: reads.append(1) or markers(self))
    os.remove(store._marker_path(1))
    checked = check_usable(FeatureStore.open(store.url), ["layers/1"], allow_incomplete=True)
    assert len(reads) == 1
    assert checked.unmarked == [1]
    start, stop = store.shard_rows(1)
    assert not set(range(start, stop)) & set(checked.rows.tolist())
    assert len(checked.rows) == store.num_images - (stop - start)
