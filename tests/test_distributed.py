"""Team scale: extraction as Dask tasks, killed workers, racing commands on S3, live readers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_extract import REPO, extract_args, only_store, tree_bytes
from test_remote import assert_same_contents, contents, remote_objects, remote_store
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.demo_data import make_demo_dataset
from featcache.distributed import connect, extract_on_dask
from featcache.extract import ExtractConfig, plan_extraction
from featcache.store import FeatureStore

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("dist"), num_classes=3, per_class=8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("single")
    assert runner.invoke(app, extract_args(demo, out)).exit_code == 0
    return tree_bytes(only_store(out))


@pytest.fixture(scope="module")
def client():
    with connect("local:2") as dask_client:
        yield dask_client


def _config(demo, out, **kw) -> ExtractConfig:
    return ExtractConfig(
        models=["dinov2-tiny"],
        data=str(demo),
        out=str(out),
        layers=[1, 3, 6],
        **{"shard_size": 4, "batch_size": 3, **kw},
    )


def test_local_cluster_equals_single_process(tmp_path, demo, reference, client):
    result = extract_on_dask(plan_extraction(_config(demo, tmp_path)), client)
    assert result["shards_processed"] == 5 and result["stores"][0]["complete"]
    assert tree_bytes(only_store(tmp_path)) == reference
    # the summary is the store as the workers left it (precision_error: measured by a worker)
    assert result["stores"][0] == FeatureStore.open(str(only_store(tmp_path))).summary()
    assert result["stores"][0]["precision_error"]["against"] == "fp32"


def test_killed_worker_still_yields_complete_store(tmp_path, demo, client):
    config = dict(batch_size=1, shard_size=2)  # 9 small shards: the job outlives the kill
    single = plan_extraction(_config(demo, tmp_path / "single", **config))
    from featcache.extract import run_extraction

    run_extraction(single)
    plan = plan_extraction(_config(demo, tmp_path / "dask", **config))
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(extract_on_dask(plan, client)))
    job.start()
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 120
    markers = "dask/*/*.zarr/markers/shard-*/zarr.json"
    while time.monotonic() < deadline and not list(tmp_path.glob(markers)):
        time.sleep(0.01)
    marked_at_kill = len(list(tmp_path.glob(markers)))
    victim = next(iter(pids.values()))
    os.kill(victim, signal.SIGKILL)  # the nanny restarts it; its task is retried
    job.join(timeout=300)
    assert marked_at_kill < 9
    assert outcome["stores"][0]["complete"]
    assert victim not in client.run(os.getpid).values()
    store = FeatureStore.open(str(only_store(tmp_path / "dask")))
    assert store.verify() == []
    assert tree_bytes(only_store(tmp_path / "dask")) == tree_bytes(only_store(tmp_path / "single"))


def test_cli_scheduler_option(tmp_path, demo, reference):
    result = runner.invoke(app, extract_args(demo, tmp_path, "--scheduler", "local:2"))
    assert result.exit_code == 0, result.output
    assert "dask scheduler: tcp://127.0.0.1" in result.output
    assert tree_bytes(only_store(tmp_path)) == reference
    result = runner.invoke(app, extract_args(demo, tmp_path, "--scheduler", "udp://x"))
    assert result.exit_code == 2 and "tcp://HOST:PORT" in result.output


def _command(demo, out, *extra):
    command = [sys.executable, "-m", "cli.featcache_app", *extract_args(demo, out, *extra)]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_racing_commands_on_s3_give_the_single_process_store(s3_bucket, demo, tmp_path):
    local = tmp_path / "local"
    assert runner.invoke(app, extract_args(demo, local)).exit_code == 0
    root = f"s3://{s3_bucket}/shared"
    racers = [_command(demo, root) for _ in range(2)]
    for racer in racers:
        _, stderr = racer.communicate(timeout=300)
        assert racer.returncode == 0, stderr.decode()[-3000:]
    url = remote_store(root)
    assert_same_contents(contents(url), contents(str(only_store(local))))
    files = tree_bytes(only_store(local))
    assert remote_objects(url) == files


def test_reader_never_sees_an_unmarked_shard(tmp_path, demo):
    writer = _command(demo, tmp_path, "--batch-size", "1")
    seen_partial = False
    try:
        while writer.poll() is None:
            stores = list(tmp_path.glob("*/*.zarr"))
            if not stores:
                continue
            try:
                store = FeatureStore.open(str(stores[0]))
            except Exception:  # creation still under way: not a store yet
                continue
            marked = store.marked_shards()
            seen_partial |= 0 < len(marked) < store.num_shards
            for shard in marked:
                start, stop = store.shard_rows(shard)
                for name in ("layers/1", "final", "pooled"):
                    assert np.isfinite(store.read(name, slice(start, stop))).all(), (shard, name)
    finally:
        writer.wait(timeout=300)
    assert writer.returncode == 0
    assert seen_partial  # the reader did look while the writer was half way
