"""Reads prove their shard (issue 21, point 2), and damaged stores never end in a traceback.

Every read of a marked shard's object (``FeatureStore.read``, the loader's direct shard-file
path and its zarr path, cka's dask reads) compares the object's digest, taken from its index and
chunk checksums, with the one its marker records, once per (array, shard) per open store, and
refuses a mismatch naming the store, array and shard and pointing at ``featcache verify``.
Damaged metadata (a ``zarr.json`` of any array or group, root attributes that contradict each
other or the arrays) is refused when the store is opened, naming the file or attribute. Each
damage kind is run through the CLIs: ``stitchtrain fit`` (one ``error:`` line, exit 2) and
``featcache verify`` (fault lines, exit 1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import extract_demo_stores, fake_store_spec
from typer.testing import CliRunner

from cli.experiments_app import experiments_app
from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.store import FeatureStore, StoreError
from stitchtrain.data.loader import FeatureLoader, Field

runner = CliRunner()
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split): url}: dinov2-tiny and clip-tiny, layer 2, shards of 4 (18 train rows in
    5 shards, 6 test rows in 2)."""
    root = tmp_path_factory.mktemp("trust")
    models = ["dinov2-tiny", "clip-tiny"]
    return extract_demo_stores(
        root / "data", root / "stores", models=models, layers=[2], shard_size=4
    )


# -- damage -------------------------------------------------------------------------------------
def _swap(path: Path, name: str, a: int = 1, b: int = 2) -> None:
    store = FeatureStore.open(str(path))
    first, second = path / store.object_key(name, a), path / store.object_key(name, b)
    one, two = first.read_bytes(), second.read_bytes()
    first.write_bytes(two)
    second.write_bytes(one)


def _foreign(path: Path, stores) -> None:
    """Shard 1 of layers/2 replaced by shard 0 of another store of the same shape (the test
    split's: same encoder, same shard size)."""
    other = FeatureStore.open(stores["dinov2-tiny", "test"])
    source = Path(other.url) / other.object_key("layers/2", 0)
    target = path / "layers/2/c/1/0/0"
    assert source.stat().st_size == target.stat().st_size
    shutil.copy(source, target)


def _flip(path: Path, key: str, where: float = 0.0) -> None:
    data = bytearray((path / key).read_bytes())
    data[int((len(data) - 4) * where)] ^= 0x01  # a byte of the chunk, not its checksum
    (path / key).write_bytes(bytes(data))


def _edit_marker_digest(path: Path) -> None:
    marker = path / "markers/shard-000001/zarr.json"
    meta = json.loads(marker.read_text())
    meta["attributes"]["featcache_marker"]["objects"]["layers/2"]["digest"] += 1
    marker.write_text(json.dumps(meta))


def _edit_root(path: Path, edit) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"]["featcache"])
    (path / "zarr.json").write_text(json.dumps(meta))


# (damage, function of (store path, stores), words the fit error must hold)
SHARD_DAMAGE = {
    "swapped layers/2 shards": (lambda p, s: _swap(p, "layers/2"), ["layers/2", "shard 1"]),
    "foreign layers/2 shard": (_foreign, ["layers/2", "shard 1"]),
    "deleted ids chunk": (lambda p, s: (p / "ids/c/1/0").unlink(), ["ids", "shard 1"]),
    "edited marker digest": (lambda p, s: _edit_marker_digest(p), ["layers/2", "shard 1"]),
    "flipped valid chunk": (lambda p, s: _flip(p, "valid/c/1"), ["valid", "shard 1"]),
    "flipped ids chunk": (lambda p, s: _flip(p, "ids/c/1/0", 0.5), ["ids", "shard 1"]),
    "truncated ids chunk": (
        lambda p, s: (p / "ids/c/1/0").write_bytes((p / "ids/c/1/0").read_bytes()[:-3]),
        ["ids", "shard 1"],
    ),
}
METADATA_DAMAGE = {
    "corrupt layers/2 zarr.json": (
        lambda p, s: (p / "layers/2/zarr.json").write_text("{ not json"),
        ["layers/2/zarr.json"],
    ),
    "deleted labels zarr.json": (
        lambda p, s: (p / "labels/zarr.json").unlink(),
        ["labels/zarr.json"],
    ),
    "corrupt valid zarr.json": (
        lambda p, s: (p / "valid/zarr.json").write_text('{"zarr_format": 3}'),
        ["valid/zarr.json"],
    ),
    "deleted layers group zarr.json": (
        lambda p, s: (p / "layers/zarr.json").unlink(),
        ["layers/zarr.json"],
    ),
    "corrupt markers group zarr.json": (
        lambda p, s: (p / "markers/zarr.json").write_text("[]"),
        ["markers/zarr.json"],
    ),
    "edited num_images": (
        lambda p, s: _edit_root(p, lambda a: a["dataset"].update(num_images=17)),
        ["num_images", "17"],
    ),
    "edited shard_size": (
        lambda p, s: _edit_root(p, lambda a: a.update(shard_size=8)),
        ["shard_size", "8"],
    ),
    "edited num_shards": (
        lambda p, s: _edit_root(p, lambda a: a.update(num_shards=4)),
        ["num_shards", "4"],
    ),
    # JSON nested deeper than Python's parser recurses: a RecursionError, not a JSONDecodeError
    "deeply nested root zarr.json": (
        lambda p, s: (p / "zarr.json").write_text(DEEP),
        ["zarr.json", "nested too deeply"],
    ),
    "deeply nested marker": (  # shard 1 is then unmarked: fit calls the store incomplete
        lambda p, s: (p / "markers/shard-000001/zarr.json").write_text(DEEP),
        ["marker"],
    ),
}
DAMAGE = {**SHARD_DAMAGE, **METADATA_DAMAGE}


def _damaged_source(stores, tmp_path, damage: str) -> str:
    copy = tmp_path / "source.zarr"
    shutil.copytree(stores["dinov2-tiny", "train"], copy)
    DAMAGE[damage][0](copy, stores)
    return str(copy)


def _one_error_line(result, *words: str) -> str:
    """The CLI ended with exit 2 and one ``error:`` line holding ``words``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    for word in words:
        assert word in line, (word, line)
    return line


def _fit_args(stores, source: str, out: Path) -> list[str]:
    args = ["fit", "--source", source, "--target", stores["clip-tiny", "train"]]
    args += ["--source-test", stores["dinov2-tiny", "test"]]
    args += ["--target-test", stores["clip-tiny", "test"]]
    args += ["--position", "2", "--out", str(out), "--objective", "ffm"]
    return [*args, "--lr", "5e-3", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]


# -- fit and verify through the CLIs, for every damage kind --------------------------------------
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_fit_refuses_a_damaged_store_in_one_line(stores, tmp_path, damage):
    source = _damaged_source(stores, tmp_path, damage)
    result = runner.invoke(stitchtrain_app, _fit_args(stores, source, tmp_path / "run"))
    line = _one_error_line(result, source, *DAMAGE[damage][1])
    if damage in SHARD_DAMAGE:
        assert f"featcache verify {source}" in line
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_reports_a_damaged_store_as_faults(stores, tmp_path, damage):
    source = _damaged_source(stores, tmp_path, damage)
    result = runner.invoke(featcache_app, ["verify", source])
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    faults = [line for line in result.output.splitlines() if line.startswith("fault:")]
    assert faults, result.output
    name = DAMAGE[damage][1][0]
    assert any(name in fault for fault in faults), faults
    as_json = runner.invoke(featcache_app, ["verify", source, "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["ok"] is False


# -- the other readers ----------------------------------------------------------------------------
def test_probe_refuses_swapped_pooled_shards(stores, tmp_path):
    copy = tmp_path / "probe.zarr"
    shutil.copytree(stores["dinov2-tiny", "train"], copy)
    _swap(copy, "pooled")
    args = ["probe", "--store", str(copy), "--out", str(tmp_path / "probe")]
    args += ["--test-store", stores["dinov2-tiny", "test"], "--epochs", "1", "--lr", "5e-3"]
    result = runner.invoke(stitchtrain_app, args)
    _one_error_line(result, str(copy), "pooled", "shard 1", "featcache verify")


def test_show_refuses_swapped_layer_shards(stores, tmp_path):
    copy = tmp_path / "show.zarr"
    shutil.copytree(stores["dinov2-tiny", "train"], copy)
    _swap(copy, "layers/2")
    args = ["show", str(copy), "--layer", "2", "--rows", "0,5"]
    result = runner.invoke(featcache_app, [*args, "--out", str(tmp_path / "maps.png")])
    _one_error_line(result, str(copy), "layers/2", "shard 1", "featcache verify")
    assert not (tmp_path / "maps.png").exists()


def test_cka_refuses_swapped_layer_shards(stores, tmp_path):
    copy = tmp_path / "cka.zarr"
    shutil.copytree(stores["dinov2-tiny", "train"], copy)
    _swap(copy, "layers/2")
    args = ["cka", str(copy), stores["clip-tiny", "train"], "--layers", "2"]
    result = runner.invoke(experiments_app, [*args, "--out", str(tmp_path / "cka")])
    _one_error_line(result, str(copy), "layers/2", "shard 1", "featcache verify")


# -- the proof reads no data twice ---------------------------------------------------------------
def _big_store(path: Path, compression: str = "none") -> FeatureStore:
    """64 rows in 4 shards of 16; layers/1 rows of 5 tokens x 1024 float16 (10 kB a row)."""
    spec = fake_store_spec(
        width=1024, num_images=64, shard_size=16, compression=compression, id_width=8
    )
    store = FeatureStore.create(str(path), spec)
    rng = np.random.default_rng(0)
    for shard in range(store.num_shards):
        start, stop = store.shard_rows(shard)
        arrays = {
            name: rng.standard_normal((stop - start, *store.group[name].shape[1:]))
            for name in store.feature_arrays()
        }
        arrays["ids"] = np.array([f"{row:04d}" for row in range(start, stop)])
        arrays["labels"] = np.zeros(stop - start, np.int64)
        arrays["valid"] = np.ones(stop - start, bool)
        store.write_shard(shard, arrays, {"rows": [start, stop], "skipped": []})
    return FeatureStore.open(str(path))


def _bytes_read() -> int:
    """Bytes this process has read through system calls (all threads), from /proc."""
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


@pytest.mark.parametrize("compression", ["none", "zstd"])  # direct shard files; zarr
def test_the_proof_adds_no_pass_over_the_data(tmp_path, compression):
    """A staged load reads each object about once: the proof takes the index and the 4-byte
    chunk checksums (a pass over the data for the digest would double the bytes read)."""
    made = _big_store(tmp_path / "s.zarr", compression)
    objects = sum(
        (Path(made.url) / made.object_key("layers/1", shard)).stat().st_size
        for shard in range(made.num_shards)
    )

    def staged_load() -> int:
        before = _bytes_read()
        store = FeatureStore.open(made.url)
        loader = FeatureLoader([Field("x", store, "layers/1")], np.arange(64), 16, read_workers=1)
        assert loader.staged
        loader.stage()
        return _bytes_read() - before

    staged_load()  # imports and caches warmed
    assert staged_load() < objects * 1.2 + 64_000, objects
    _swap(Path(made.url), "layers/1", 0, 3)  # and the same load is refused
    with pytest.raises(StoreError, match=r"layers/1.*shard 0.*featcache verify"):
        staged_load()


def test_each_object_is_proven_once_per_open_store(tmp_path):
    """Streamed epochs re-read shards: the proof is made on the first read only, and a store
    opened afresh proves again."""
    made = _big_store(tmp_path / "s.zarr")
    store = FeatureStore.open(made.url)
    loader = FeatureLoader(
        [Field("x", store, "layers/1")], np.arange(64), 16, memory_budget=1, read_workers=1
    )
    assert not loader.staged
    list(loader.epoch(0))
    assert store.proven_objects() == {("layers/1", shard) for shard in range(4)}
    _swap(Path(made.url), "layers/1", 0, 3)
    list(loader.epoch(1))  # proven when first read: the bytes now read are checksummed still
    with pytest.raises(StoreError, match=r"layers/1.*shard 0.*featcache verify"):
        FeatureStore.open(made.url).read("layers/1", slice(0, 2))


def test_unmarked_shards_read_as_fill_and_marked_missing_objects_are_errors(tmp_path):
    made = _big_store(tmp_path / "s.zarr")
    (Path(made.url) / "markers/shard-000002/zarr.json").unlink()
    (Path(made.url) / made.object_key("labels", 2)).unlink()
    store = FeatureStore.open(made.url)
    assert (store.read("labels")[32:48] == -1).all()  # shard 2 does not exist for readers
    (Path(made.url) / made.object_key("labels", 1)).unlink()
    with pytest.raises(StoreError, match=r"labels.*shard 1.*is missing.*featcache verify"):
        FeatureStore.open(made.url).read("labels")
