"""Durability across power loss, and file modes.

The rule SQLite and LMDB follow: the data, then the file (fsync), then its directory (fsync
after the rename), then the commit record, then the commit record's directory. A rename or a
new folder is on disk only once the folder holding its name is fsynced after it. Each test
records every ``os.fsync`` (by the path of its descriptor), ``os.replace`` / ``os.link`` and
successful ``os.mkdir`` in the order they happen, and checks that order: for a store's creation
and first shard, a later shard, and a fit's checkpoints.

Every file the tools write follows the umask (safetensors' own ``save_file`` writes 0600).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import extract_demo_stores, fake_store_spec, pair_fit_config

from featcache.store import FeatureStore


def _canonical(path) -> str:
    path = os.fspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


class Recorder:
    """The ordered (kind, path[, target]) events: ("fsync", path), ("rename", source, target),
    ("mkdir", path)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def index(self, kind: str, path, start: int = 0, stop: int | None = None) -> list[int]:
        """Indexes in [start, stop) of ``kind`` events on ``path`` (renames: by target)."""
        path = _canonical(path)
        stop = len(self.events) if stop is None else stop
        return [
            i
            for i in range(start, stop)
            if self.events[i][0] == kind and self.events[i][-1] == path
        ]

    def fsynced(self, path, start: int, stop: int) -> bool:
        return bool(self.index("fsync", path, start, stop))

    def assert_file_durable(self, path, before: int) -> None:
        """The file at ``path`` reached its name by a rename, its bytes were fsynced (as the
        temp file before the rename, or at ``path`` after it), and its folder after the
        rename: all before event ``before``."""
        renames = self.index("rename", path, 0, before)
        assert renames, f"{path} was not renamed into place before event {before}"
        at = renames[-1]
        source = self.events[at][1]
        assert self.fsynced(source, 0, at) or self.fsynced(path, at, before), (
            f"{path}: its bytes were not fsynced before event {before}"
        )
        assert self.fsynced(os.path.dirname(_canonical(path)), at + 1, before), (
            f"{path}: its folder was not fsynced after its rename (event {at}) and before {before}"
        )

    def assert_new_folders_durable(self, before: int, *, start: int = 0, but=()) -> None:
        """Every folder made in [start, before) (those in ``but`` aside) had its parent fsynced
        after it was made and before event ``before``."""
        but = {_canonical(p) for p in but}
        for at in range(start, before):
            kind, *paths = self.events[at]
            if kind != "mkdir" or paths[0] in but:
                continue
            assert self.fsynced(os.path.dirname(paths[0]), at + 1, before), (
                f"new folder {paths[0]} (event {at}): its parent was not fsynced before {before}"
            )


@pytest.fixture()
def recorder(monkeypatch) -> Recorder:
    return _record(monkeypatch)


def _record(monkeypatch) -> Recorder:
    """A ``Recorder`` of every fsync, rename and mkdir from now until the test ends."""
    recorded = Recorder()
    fsync, replace, link, mkdir = os.fsync, os.replace, os.link, os.mkdir

    def recording_fsync(descriptor):
        recorded.events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return fsync(descriptor)

    def recording_replace(source, target, **kwargs):
        replace(source, target, **kwargs)
        recorded.events.append(("rename", _canonical(source), _canonical(target)))

    def recording_link(source, target, **kwargs):
        link(source, target, **kwargs)
        recorded.events.append(("rename", _canonical(source), _canonical(target)))

    def recording_mkdir(path, *args, **kwargs):
        mkdir(path, *args, **kwargs)
        recorded.events.append(("mkdir", _canonical(os.path.abspath(path))))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(os, "link", recording_link)
    monkeypatch.setattr(os, "mkdir", recording_mkdir)
    return recorded


def _spec(compression: str):
    return fake_store_spec(
        num_images=10, classes=["a", "b"], layers=(1, 3), compression=compression,
        shard_size=4, mask_shape=(4, 5), id_width=24,
    )  # fmt: skip


def _write(store: FeatureStore, shard: int) -> None:
    rng = np.random.default_rng(shard)
    start, stop = store.shard_rows(shard)
    rows = stop - start
    arrays = {
        name: rng.standard_normal((rows, *store.group[name].shape[1:])).astype(np.float32)
        for name in store.feature_arrays()
    }
    arrays["ids"] = np.array([f"a/{row:04d}.jpg" for row in range(start, stop)])
    arrays["labels"] = np.arange(start, stop, dtype=np.int64) % 2
    arrays["valid"] = np.ones(rows, bool)
    arrays["masks"] = rng.integers(0, 3, (rows, 4, 5)).astype(np.int16)
    store.write_shard(shard, arrays, {"rows": [start, stop], "skipped": []})


def _assert_shard_durable(recorder: Recorder, store: FeatureStore, shard: int, start: int) -> None:
    """Shard ``shard``'s objects and every folder made for them are durable before its marker
    is renamed into place; the marker's folder (and the folder holding that) is fsynced after."""
    marker = store._marker_path(shard)
    (marker_at,) = recorder.index("rename", marker)
    for record in store.read_marker(shard)["objects"].values():
        recorder.assert_file_durable(f"{store.url}/{record['key']}", marker_at)
    recorder.assert_new_folders_durable(marker_at, start=start, but=[os.path.dirname(marker)])
    recorder.assert_file_durable(marker, len(recorder.events))
    recorder.assert_new_folders_durable(len(recorder.events), start=start)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_new_store_is_durable_before_its_first_marker(tmp_path, recorder, compression):
    """Every ``zarr.json`` written at creation, every new folder up to the store root (and the
    root in its parent) is on disk before the first marker; the marker's folder after it."""
    url = str(tmp_path / "new" / "s.zarr")
    store = FeatureStore.create(url, _spec(compression))
    _write(store, 0)
    (marker_at,) = recorder.index("rename", store._marker_path(0))
    documents = [p for p in Path(url).rglob("zarr.json") if "shard-" not in str(p)]
    assert len(documents) == 2 + 1 + len(store.array_names())  # root, layers, markers, arrays
    for document in documents:
        recorder.assert_file_durable(document, marker_at)
    made = {e[1] for e in recorder.events if e[0] == "mkdir"}
    assert {_canonical(tmp_path / "new"), _canonical(url)} <= made
    _assert_shard_durable(recorder, store, 0, 0)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_later_shard_is_durable_before_its_marker(tmp_path, monkeypatch, compression):
    url = str(tmp_path / "s.zarr")
    _write(FeatureStore.create(url, _spec(compression)), 0)
    recorded = _record(monkeypatch)  # from here on
    store = FeatureStore.create(url, _spec(compression))  # a re-run reopens the store
    _write(store, 1)
    _assert_shard_durable(recorded, store, 1, 0)


def test_attrs_added_after_creation_are_durable(tmp_path, monkeypatch):
    """``update_attrs`` (``precision_error``) rewrites the root ``zarr.json``: on disk on return."""
    store = FeatureStore.create(str(tmp_path / "s.zarr"), _spec("none"))
    recorded = _record(monkeypatch)
    store.update_attrs({"precision_error": {"against": "fp32", "max_abs": 0.0}})
    recorded.assert_file_durable(tmp_path / "s.zarr" / "zarr.json", len(recorded.events))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("durability")
    return extract_demo_stores(
        root / "data", root / "stores", models=["dinov2-tiny", "clip-tiny"], layers=[2],
        shard_size=4, num_classes=2, per_class=4,
    )  # fmt: skip


def test_a_fit_checkpoint_is_durable_and_then_its_run_dir(stores, tmp_path, recorder):
    """Each checkpoint: its tensors file (bytes, then the run dir) before checkpoint.json is
    renamed into place; the run dir fsynced after that rename, before anything else is
    renamed."""
    from stitchtrain.pipeline.fit import StitchRecipe

    out = tmp_path / "run"
    config = pair_fit_config(stores, out, objective="tlt", lrs=(1e-3,), epochs=2, patience=2)
    StitchRecipe(config, checkpoint_every=0).run()
    commits = recorder.index("rename", out / "checkpoint.json")
    assert len(commits) == 3  # after each epoch, and at the learning rate's end
    renames = [i for i, e in enumerate(recorder.events) if e[0] == "rename"]
    for at in commits:
        tensors = [
            i for i in renames
            if i < at and Path(recorder.events[i][2]).name.startswith("checkpoint-")
        ]  # fmt: skip
        recorder.assert_file_durable(recorder.events[tensors[-1]][2], at)
        following = next((i for i in renames if i > at), len(recorder.events))
        recorder.assert_file_durable(out / "checkpoint.json", following)


def _extract(root: Path) -> dict[tuple[str, str], str]:
    """Stores of dinov2-tiny and clip-tiny (layer 2) in the presets' own geometry, which the
    encoders loaded by name have (a tree is built from one)."""
    from featcache.demo_data import make_demo_dataset
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    models = ["dinov2-tiny", "clip-tiny"]
    manifest = make_demo_dataset(root / "data", num_classes=2, per_class=4)
    urls = {}
    for split in ("train", "test"):
        plan = plan_extraction(
            ExtractConfig(
                models=models, data=str(manifest), out=str(root / "stores"), layers=[2],
                split=split, shard_size=4, num_workers=0, resize_mode="shortest",
            )
        )  # fmt: skip
        run_extraction(plan)
        urls.update({(m, split): url for m, url in zip(models, plan.urls, strict=True)})
    return urls


def _modes(*roots: Path) -> dict[str, int]:
    return {
        str(path): stat.S_IMODE(path.stat().st_mode)
        for root in roots
        for path in [root, *root.rglob("*")]
    }


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_every_file_of_stores_run_probe_and_tree_dirs_follows_the_umask(tmp_path, umask):
    """stitch.safetensors and head.safetensors included: teammates read the trained weights."""
    import featcache
    from stitchtrain.hybrid.export import export_hybrid
    from stitchtrain.pipeline.fit import StitchRecipe
    from stitchtrain.scoring.probe import probe_store
    from stitchtrain.tree.model import VFMStitchTree

    previous = os.umask(umask)
    try:
        stores = _extract(tmp_path)
        out = tmp_path / "run"
        config = pair_fit_config(stores, out, objective="ffm+tlt", lrs=(1e-3,), epochs=1)
        StitchRecipe(config, checkpoint_every=0).run()
        source = stores["dinov2-tiny", "train"]
        probe_store(source, tmp_path / "probe", lrs=(1e-3,), epochs=1)
        trunk = featcache.load_encoder("dinov2-tiny")
        VFMStitchTree.from_runs(trunk, 2, [out]).save(tmp_path / "tree")
        export_hybrid(out, tmp_path / "export", with_weights=True)
    finally:
        os.umask(previous)
    folders = ("stores", "probe", "tree", "export")
    modes = _modes(out, *(tmp_path / name for name in folders))
    names = {str(Path(p).relative_to(tmp_path)) for p in modes}
    written = {"run/stitch.safetensors", "run/head.safetensors", "run/stitch-ffm.safetensors"}
    exported = {f"export/{role}.safetensors" for role in ("stitch", "source", "target")}
    assert written | exported | {"probe/head.safetensors", "tree/tree.json"} <= names
    want = {True: 0o666 & ~umask, False: 0o777 & ~umask}  # files, folders
    wrong = {p: oct(m) for p, m in modes.items() if m != want[Path(p).is_file()]}
    assert not wrong, f"expected {oct(want[True])} files, {oct(want[False])} folders: {wrong}"
