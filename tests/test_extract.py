"""featcache extract: correct features, resumable and crash-safe stores, clear bad-input errors."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array
import numpy as np
import pytest
import torch
import xarray
import zarr
from conftest import FAMILY_IDS
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.demo_data import make_demo_dataset
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.images import decode_image
from featcache.store import FeatureStore, StoreError, StoreMismatchError, StoreSpec

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """24 shape images in 3 classes (18 train, 6 test) with masks; returns the manifest."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=3, per_class=8)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: bitwise store comparison."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def extract_args(manifest, out, *extra, model="dinov2-tiny", layers="1,3,6"):
    return [
        "extract",
        "--model",
        model,
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--layers",
        layers,
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        *extra,
    ]


def only_store(root: Path) -> Path:
    stores = list(root.glob("*/*.zarr"))
    assert len(stores) == 1, stores
    return stores[0]


# -- correctness -------------------------------------------------------------------------------
@pytest.mark.parametrize("family_id", FAMILY_IDS)
def test_layers_equal_encoder_run(tmp_path, demo, encoder_cache, family_id):
    encoder = encoder_cache(family_id)
    layers = sorted({0, 1, encoder.depth // 2, encoder.depth})
    config = ExtractConfig(
        models=[encoder.name],
        data=str(demo),
        out=str(tmp_path / "s"),
        layers=layers,
        shard_size=5,
        batch_size=4,
    )
    plan = plan_extraction(config, encoders=[encoder])
    run_extraction(plan)
    store = FeatureStore.open(plan.urls[0])
    images = torch.stack([encoder.preprocess(decode_image(r.path)) for r in plan.records])
    with torch.no_grad():
        final, pooled = encoder.run_from(encoder.run(images, upto=0), 0)
        expected = {f"layers/{n}": encoder.run(images, upto=n) for n in layers}
    expected.update(final=final, pooled=pooled)
    for name, reference in expected.items():
        stored = store.read(name)
        assert store.group[name].dtype == np.float16
        reference = reference.numpy()
        assert stored.shape == reference.shape
        # float16 rounding: half an ulp, 2**-11 relative, plus fp32 batch-size noise
        np.testing.assert_allclose(stored, reference, rtol=2**-10, atol=1e-5, err_msg=name)
    assert list(store.read("ids")) == [r.id for r in plan.records]
    assert list(store.read("labels")) == [r.label for r in plan.records]
    assert store.is_complete and store.verify() == []


def test_rows_follow_shared_seeded_order(tmp_path, demo):
    result = runner.invoke(app, extract_args(demo, tmp_path, "--model", "siglip2-tiny"))
    assert result.exit_code == 0, result.output
    stores = sorted(tmp_path.glob("train/*.zarr"))
    assert len(stores) == 2
    ids = [list(FeatureStore.open(str(s)).read("ids")) for s in stores]
    assert ids[0] == ids[1]
    assert ids[0] != sorted(ids[0])  # a permutation, not file order


def test_masks_follow_image_geometry(tmp_path, demo, encoder_cache):
    encoder = encoder_cache("dinov2")
    runner.invoke(app, extract_args(demo, tmp_path))
    store = FeatureStore.open(str(only_store(tmp_path)))
    masks = store.read("masks")
    assert masks.shape == (18, *encoder.image_size)
    labels = store.read("labels")
    for mask, label in zip(masks, labels, strict=True):
        assert set(np.unique(mask)) <= {0, label + 1} and (mask == label + 1).any()


def test_store_readable_without_featcache(tmp_path, demo):
    runner.invoke(app, extract_args(demo, tmp_path))
    path = str(only_store(tmp_path))
    group = zarr.open_group(path, mode="r")
    assert group["layers/3"].metadata.dimension_names == ("image", "token", "channel")
    assert group["pooled"].metadata.dimension_names == ("image", "pooled_channel")
    dataset = xarray.open_zarr(path, consolidated=False)
    assert dataset["final"].dims == ("image", "token", "channel")
    assert dataset["labels"].shape == (18,)
    layer = dask.array.from_zarr(path, component="layers/6")
    assert layer.shape == (18, 65, 96) and layer.dtype == np.float16
    assert np.isfinite(layer.compute()).all()


# -- idempotence, resume, crash safety ----------------------------------------------------------
@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, demo) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference")
    result = runner.invoke(app, extract_args(demo, out))
    assert result.exit_code == 0, result.output
    return tree_bytes(only_store(out))


def test_rerun_on_complete_store_does_nothing(tmp_path, demo, reference_store):
    runner.invoke(app, extract_args(demo, tmp_path))
    store = only_store(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    result = runner.invoke(app, extract_args(demo, tmp_path, "--json"))
    assert result.exit_code == 0
    assert '"shards_processed": 0' in result.output
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before
    assert tree_bytes(store) == reference_store


def test_partial_store_finishes_missing_shards(tmp_path, demo, reference_store):
    result = runner.invoke(app, extract_args(demo, tmp_path, "--shard", "1/3"))
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(str(only_store(tmp_path)))
    assert store.marked_shards() == {1, 4} and not store.is_complete
    assert any("no completion marker" in fault for fault in store.verify())
    result = runner.invoke(app, extract_args(demo, tmp_path, "--json"))
    assert '"shards_processed": 3' in result.output
    assert tree_bytes(only_store(tmp_path)) == reference_store


def _extract_process(demo, out, *extra):
    command = [sys.executable, "-m", "cli.featcache_app", *extract_args(demo, out, *extra)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.parametrize("kill_after_markers", [0, 1, 3])
def test_sigkill_then_rerun_is_bitwise_equal(tmp_path, demo, reference_store, kill_after_markers):
    """kill -9 once ``kill_after_markers`` shards are marked (0: as soon as the store exists)."""
    process = _extract_process(demo, tmp_path, "--batch-size", "1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        stores = list(tmp_path.glob("*/*.zarr"))
        markers = list(stores[0].glob("markers/shard-*/zarr.json")) if stores else []
        if stores and (stores[0] / "zarr.json").exists() and len(markers) >= kill_after_markers:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode == -signal.SIGKILL and list(tmp_path.glob("*/*.zarr")):
        try:
            partial = FeatureStore.open(str(only_store(tmp_path)))
        except StoreError:  # killed before the store's attrs were written: not a store yet
            partial = None
        assert partial is None or not partial.is_complete
    result = runner.invoke(app, extract_args(demo, tmp_path))
    assert result.exit_code == 0, result.output
    store = only_store(tmp_path)
    assert not [p for p in store.rglob("*") if ".partial" in p.name]
    assert tree_bytes(store) == reference_store


def test_concurrent_shard_processes_equal_single_process(tmp_path, demo, reference_store):
    processes = [_extract_process(demo, tmp_path, "--shard", f"{i}/2") for i in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr.decode()[-2000:]
    assert tree_bytes(only_store(tmp_path)) == reference_store


@pytest.mark.parametrize("where", ["feature shard file", "zarr array"])
def test_write_failure_leaves_no_marker_and_rerun_completes(
    tmp_path, demo, reference_store, monkeypatch, where
):
    """A full disk while shard 2 is written: through featcache's own feature-shard writer, or
    through zarr (labels)."""
    import featcache.store.storage as storage

    failed = []
    if where == "zarr array":
        original = storage.WriterLocalStore.set

        async def full_disk(self, key, value):
            if key.startswith("labels/c/2") and not failed:
                failed.append(key)
                raise OSError(errno.ENOSPC, "No space left on device")
            return await original(self, key, value)

        monkeypatch.setattr(storage.WriterLocalStore, "set", full_disk)
    else:
        original_replace = storage.os.replace

        def full_disk_replace(source, target):
            if "/final/c/2/" in str(target) and not failed:
                failed.append(target)
                raise OSError(errno.ENOSPC, "No space left on device")
            return original_replace(source, target)

        monkeypatch.setattr(storage.os, "replace", full_disk_replace)
    result = runner.invoke(app, extract_args(demo, tmp_path))
    assert result.exit_code == 2 and failed
    assert "shard 2" in result.output and "No space left" in result.output
    store = FeatureStore.open(str(only_store(tmp_path)))
    assert store.marked_shards() == {0, 1}
    monkeypatch.undo()
    result = runner.invoke(app, extract_args(demo, tmp_path))
    assert result.exit_code == 0, result.output
    assert not [p for p in only_store(tmp_path).rglob("*") if ".partial" in p.name]
    assert tree_bytes(only_store(tmp_path)) == reference_store


def test_different_encoder_on_existing_store_is_refused(tmp_path, demo):
    target = tmp_path / "mine.zarr"
    assert runner.invoke(app, extract_args(demo, target)).exit_code == 0
    theirs = FeatureStore.open(str(target)).attrs["encoder"]["fingerprint"]
    for extra in (["--model", "dinov3-tiny"], ["--layers", "1,2"]):
        args = extract_args(demo, target)
        if extra[0] == "--model":
            args[args.index("--model") + 1] = extra[1]
        else:
            args[args.index("--layers") + 1] = extra[1]
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert "different settings" in result.output
    assert theirs in result.output or "layers" in result.output
    result = runner.invoke(
        app, [*extract_args(demo, target)[:2], "dinov3-tiny", *extract_args(demo, target)[3:]]
    )
    assert theirs in result.output  # names both fingerprints


# -- bad input ----------------------------------------------------------------------------------
@pytest.fixture()
def bad_folder(tmp_path) -> Path:
    """An image folder with five good images and five bad files of different kinds."""
    import io

    from PIL import Image

    root = tmp_path / "bad"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(5):
        Image.new("RGB", (40, 30), (40 * i, 10, 200)).save(
            root / ("a" if i % 2 else "b") / f"ok{i}.png"
        )
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("not an image")
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    Image.new("RGB", (200, 200)).save(root / "b" / "bomb.png")
    return root


def test_bad_images_fail_names_the_file(tmp_path, bad_folder, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # > 112x112 inputs, < bomb
    result = runner.invoke(app, extract_args(bad_folder, tmp_path / "out", layers="1"))
    assert result.exit_code == 2
    assert "unreadable image" in result.output and "--on-bad-image skip" in result.output
    assert any(
        name in result.output
        for name in ("truncated.jpg", "zero.jpg", "text.jpg", "corrupt.jpg", "bomb.png")
    )
    store = FeatureStore.open(str(only_store(tmp_path / "out")))
    assert not store.is_complete
    for shard in store.marked_shards():  # whatever was marked holds only good images
        start, stop = store.shard_rows(shard)
        assert store.read("valid", slice(start, stop)).all()


def test_bad_images_skip_records_each_reason(tmp_path, bad_folder, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # > 112x112 inputs, < bomb
    result = runner.invoke(
        app, extract_args(bad_folder, tmp_path, "--on-bad-image", "skip", layers="1")
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(str(only_store(tmp_path)))
    skipped = {item["id"]: item["reason"] for item in store.summary()["skipped"]}
    assert set(skipped) == {
        "a/truncated.jpg",
        "a/zero.jpg",
        "b/text.jpg",
        "b/corrupt.jpg",
        "b/bomb.png",
    }
    assert "empty" in skipped["a/zero.jpg"] and "decompression-bomb" in skipped["b/bomb.png"]
    for name in skipped:
        assert name in result.output
    valid, ids = store.read("valid"), list(store.read("ids"))
    assert valid.sum() == 5
    assert {ids[i] for i in np.flatnonzero(~valid)} == set(skipped)
    assert np.isnan(store.read("pooled")[~valid]).all()
    assert store.verify() == []  # NaN only in rows marked invalid


def test_manifest_problems_stop_before_anything_is_written(tmp_path, demo):
    rows = (demo.parent / "manifest.csv").read_text().splitlines()
    cases = {
        "missing file": rows + ["images/disc/nothere.png,disc,train,"],
        "duplicate": rows + [rows[1]],
        "bad label": rows[:1] + [r.replace(",disc,", ",2.5,") for r in rows[1:]],
    }
    for problem, lines in cases.items():
        manifest = demo.parent / f"case-{problem.replace(' ', '_')}.csv"
        manifest.write_text("\n".join(lines) + "\n")
        result = runner.invoke(app, extract_args(manifest, tmp_path / problem, layers="1"))
        assert result.exit_code == 2, problem
        assert manifest.name in result.output or "nothere.png" in result.output, problem
        if problem != "missing file":
            assert not (tmp_path / problem).exists(), problem


def test_layers_out_of_range_are_refused(tmp_path, demo):
    result = runner.invoke(app, extract_args(demo, tmp_path, layers="2,24"))
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "0..6" in flat and "dinov2-tiny" in flat and "Got 24 in --layers '2,24'" in flat


# -- other commands -----------------------------------------------------------------------------
def test_ls_info_verify_rm(tmp_path, demo):
    runner.invoke(app, extract_args(demo, tmp_path))
    runner.invoke(app, extract_args(demo, tmp_path, "--shard", "0/2", model="clip-tiny"))
    listing = runner.invoke(app, ["ls", str(tmp_path)])
    assert listing.exit_code == 0
    assert "dinov2-tiny" in listing.output and "clip-tiny" in listing.output
    assert "yes" in listing.output and "no (3/5)" in listing.output
    store = only_store(tmp_path / "x") if False else sorted(tmp_path.glob("train/dinov2*.zarr"))[0]
    info = runner.invoke(app, ["info", str(store), "--json"])
    assert '"layers/3"' in info.output and '"complete": true' in info.output
    assert runner.invoke(app, ["verify", str(store)]).exit_code == 0
    partial = sorted(tmp_path.glob("train/clip*.zarr"))[0]
    result = runner.invoke(app, ["verify", str(partial), "--json"])
    assert result.exit_code == 1 and "no completion marker" in result.output
    assert runner.invoke(app, ["rm", str(partial)]).exit_code == 0
    assert not partial.exists()
    assert runner.invoke(app, ["rm", str(tmp_path)]).exit_code == 2  # not a store: refused


def test_verify_catches_a_flipped_bit(tmp_path, demo):
    runner.invoke(app, extract_args(demo, tmp_path))
    store = only_store(tmp_path)
    shard_file = store / "layers" / "3" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0x01
    shard_file.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(store)])
    assert result.exit_code == 1
    assert "shard 1: layers/3 object layers/3/c/1/0/0 does not decode" in result.output


def test_verify_checks_fingerprint(tmp_path, demo):
    runner.invoke(app, extract_args(demo, tmp_path))
    result = runner.invoke(app, ["verify", str(only_store(tmp_path)), "--fingerprint", "abc"])
    assert result.exit_code == 1 and "fingerprint" in result.output


def test_interrupted_creation_is_resumed_never_read(tmp_path, demo, reference_store):
    """A creation killed before its attrs were written leaves only its claim: never read as a
    store, re-created by the same command."""
    runner.invoke(app, extract_args(demo, tmp_path))
    store = only_store(tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    claim = {k: group.attrs["featcache"][k] for k in ("format", "format_version", "store_id")}
    group.attrs["featcache"] = {**claim, "state": "creating"}
    with pytest.raises(StoreError, match="never fully created"):
        FeatureStore.open(str(store))
    assert runner.invoke(app, extract_args(demo, tmp_path)).exit_code == 0
    assert tree_bytes(store) == reference_store


def test_spec_validation():
    encoder = {
        "name": "x",
        "depth": 4,
        "width": 8,
        "fingerprint": "f",
        "spec": {},
        "layout": {"prefix": [], "grid": [2, 2]},
        "pooled_width": 8,
    }
    dataset = {"manifest_hash": "h", "split": "train", "order_seed": 0, "num_images": 3}
    with pytest.raises(ValueError, match="0..4"):
        StoreSpec(encoder=encoder, dataset=dataset, layers=(5,))
    with pytest.raises(ValueError, match="bitround"):
        StoreSpec(encoder=encoder, dataset=dataset, layers=(1,), compression="lz4")
    assert issubclass(StoreMismatchError, StoreError)


def test_copy_of_store_stays_valid(tmp_path, demo):
    runner.invoke(app, extract_args(demo, tmp_path / "a"))
    copy = tmp_path / "copy.zarr"
    shutil.copytree(only_store(tmp_path / "a"), copy)
    assert FeatureStore.open(str(copy)).verify() == []
