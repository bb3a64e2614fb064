"""Shared fixtures. The hub is off in tests: a stray pretrained download fails at once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # pytest -n N (bootstrap.sh test)
if WORKER:  # one torch thread per worker, and in the processes tests start (same reductions)
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import featcache._compat  # noqa: E402,F401  (the torchvision import fix, before timm loads)

torch.set_num_threads(1 if WORKER else min(2, torch.get_num_threads()))

# One entry per adapter family, tiny and random-init, LayerScale away from 1e-5 where the
# architecture has it. (id, name, load_encoder kwargs, expected prefix, expected grid)
FAMILIES = [
    ("dinov2", "dinov2-tiny", {}, ("cls",), (8, 8)),
    (
        "dinov2-reg",
        "timm:vit_small_patch14_reg4_dinov2",
        dict(random_init=True, img_size=56, depth=4, embed_dim=64, num_heads=2, init_values=0.5),
        ("cls", "reg0", "reg1", "reg2", "reg3"),
        (4, 4),
    ),
    ("dinov3", "dinov3-tiny", {}, ("cls", "reg0", "reg1", "reg2", "reg3"), (8, 8)),
    ("siglip2", "siglip2-tiny", {}, (), (8, 8)),
    (
        "clip-timm",
        "timm:vit_base_patch16_clip_224.openai",
        dict(random_init=True, img_size=64, depth=4, embed_dim=64, num_heads=2),
        ("cls",),
        (4, 4),
    ),
    ("clip-open_clip", "clip-tiny", {}, ("cls",), (8, 8)),
    (
        "siglip2-open_clip",
        "open_clip:ViT-B-16-SigLIP2@webli",
        dict(random_init=True, img_size=64, depth=4, embed_dim=64, num_heads=2),
        (),
        (4, 4),
    ),
]
FAMILY_IDS = [f[0] for f in FAMILIES]


@pytest.fixture(scope="session")
def encoder_cache():
    """Load each family once per session (loading is the slow part of these tests)."""
    cache: dict[str, featcache.Encoder] = {}

    def get(family_id: str) -> featcache.Encoder:
        if family_id not in cache:
            _, name, kwargs, _, _ = next(f for f in FAMILIES if f[0] == family_id)
            cache[family_id] = featcache.load_encoder(name, **kwargs)
        return cache[family_id]

    return get


# -- S3 on loopback -----------------------------------------------------------------------------
def _forget_s3_filesystems() -> None:
    """Drop cached s3fs instances (and their listing caches): none may outlive its server.

    Asynchronous instances (zarr's FsspecStore makes those, on zarr's event loop) do not close
    their HTTP session when dropped: close it here, on that loop.
    """
    try:
        import s3fs
    except ImportError:
        return
    for fs in list(s3fs.S3FileSystem._cache.values()):
        client = getattr(fs, "_s3creator", None)
        if not fs.asynchronous or client is None:
            continue  # synchronous instances close their session when collected
        try:
            from zarr.core.sync import sync

            sync(client.__aexit__(None, None, None), timeout=5)
        except Exception:
            s3fs.S3FileSystem.close_session(None, client)  # at least close the sockets
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3-protocol server (moto's server mode) on 127.0.0.1; yields its endpoint URL."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import logging

    requests_log = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        _forget_s3_filesystems()
        server.stop()
        requests_log.setLevel(level)


@pytest.fixture()
def s3_bucket(moto_endpoint, monkeypatch, tmp_path):
    """A fresh, empty bucket on the loopback S3 server; s3fs/aiobotocore point at it via env.

    The environment is restored and every cached s3 filesystem dropped afterwards, so later
    tests neither see this server nor hold a client bound to it.
    """
    import uuid

    import s3fs

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    _forget_s3_filesystems()
    bucket = f"featcache-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield bucket
    finally:
        _forget_s3_filesystems()


def extract_demo_stores(
    data_dir, stores_dir, *, models, layers, shard_size, seed=0, num_classes=3, per_class=8
) -> dict[tuple[str, str], str]:
    """Generate the demo dataset and extract ``models`` for its train and test splits.

    Returns ``{(model, split): store url}``; shared by the tests that need paired stores.
    """
    from featcache.demo_data import make_demo_dataset
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    manifest = make_demo_dataset(data_dir, num_classes=num_classes, per_class=per_class, seed=seed)
    urls = {}
    for split in ("train", "test"):
        config = ExtractConfig(
            models=list(models),
            data=str(manifest),
            out=str(stores_dir),
            layers=list(layers),
            split=split,
            shard_size=shard_size,
        )
        plan = plan_extraction(config)
        run_extraction(plan)
        urls.update({(m, split): u for m, u in zip(models, plan.urls, strict=True)})
    return urls


# history.csv columns that differ between any two runs; everything else must be equal
HISTORY_TIMING = ("seconds", "data_wait_s", "compute_s", "val_compute_s", "data_gb_per_s")


def history_without_timing(run_dir) -> list[dict]:
    """A run dir's history.csv rows without the ``HISTORY_TIMING`` columns."""
    import csv
    from pathlib import Path

    with open(Path(run_dir) / "history.csv") as handle:
        return [
            {k: v for k, v in row.items() if k not in HISTORY_TIMING}
            for row in csv.DictReader(handle)
        ]


def pair_fit_config(stores, out, **overrides):
    """A FitConfig for dinov2-tiny -> clip-tiny train stores of ``extract_demo_stores`` at
    position 2: FFM+TLT, lrs 1e-3 and 5e-3, 3 epochs, patience 2, batch 8; ``overrides``."""
    from stitchtrain.train.config import FitConfig

    defaults = dict(
        source=stores["dinov2-tiny", "train"],
        target=stores["clip-tiny", "train"],
        position=2,
        out=str(out),
        objective="ffm+tlt",
        lrs=(1e-3, 5e-3),
        epochs=3,
        patience=2,
        batch_size=8,
    )
    return FitConfig(**{**defaults, **overrides})


def fake_store_spec(
    *,
    name="fake",
    fingerprint="f",
    depth=4,
    width=6,
    num_images=10,
    classes=(),
    manifest_hash="h",
    **spec,
):
    """A StoreSpec of a fake encoder (no model: a 2x2 token grid after a cls token, pooled
    width 3) over ``num_images`` images; ``spec``: StoreSpec fields (default layers (1,),
    id width 16)."""
    from featcache.store import StoreSpec

    encoder = {
        "name": name,
        "depth": depth,
        "width": width,
        "fingerprint": fingerprint,
        "spec": {},
        "layout": {"prefix": ["cls"], "grid": [2, 2]},
        "pooled_width": 3,
    }
    dataset = {
        "source": "x",
        "manifest_hash": manifest_hash,
        "split": "train",
        "order_seed": 0,
        "num_images": num_images,
        "classes": list(classes),
    }
    return StoreSpec(encoder=encoder, dataset=dataset, **{"layers": (1,), "id_width": 16, **spec})


def reseal_marker(url: str, *shards: int) -> None:
    """Rewrite the markers of ``shards`` (default: every marked shard) to vouch for their
    objects as they are now on disk: what a writer that wrote those bytes (NaN rows planted
    through zarr, a flag edited) would have recorded. Reads prove every shard against its
    marker, so edits made below featcache need this to read back."""
    from featcache.store import FeatureStore

    store = FeatureStore.open(url, mode="r+")
    for shard in shards or sorted(store.marked_shards()):
        marker = store.read_marker(shard)
        objects = {name: store._object_record(name, shard) for name in store.array_names()}
        info = {k: v for k, v in marker.items() if k not in ("shard", "store_id")}
        store.write_marker(shard, {**info, "objects": objects})


def folder_with_unreadable_images(data) -> None:
    """A class folder at ``data`` (classes a, b) of 5 readable PNGs and 2 files that are no
    image (``--on-bad-image skip`` records them as skipped)."""
    from PIL import Image

    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (40, 30), (40 * i, 10, 200)).save(data / "ab"[i % 2] / f"ok{i}.png")
    (data / "a" / "text.jpg").write_text("not an image")
    (data / "b" / "empty.jpg").write_bytes(b"")
