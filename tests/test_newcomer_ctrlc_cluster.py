"""Ctrl-C (issue 23.1) during `featcache extract --scheduler local:2`: a real SIGINT to the
process group, as a terminal sends it (a file of its own so that the suite's workers run it
beside the other Ctrl-C tests)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from test_newcomer_ctrlc import (
    ENV,
    REPO,
    _chunks,
    _cli,
    _extract_args,
    _one_line,
    _run,
    make_stores,
)

from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory)


# -- extract on a Dask cluster ---------------------------------------------------------------------
def test_ctrl_c_during_extract_on_a_local_cluster_keeps_the_marked_shards(stores, tmp_path):
    """`extract --scheduler local:2`, 18 shards of one image; Ctrl-C as a terminal sends it
    (SIGINT to the whole process group: the command and its worker processes) once the first
    shard is written: no shard is submitted after it, the shards in flight finish with their
    markers, the line counts the complete shards, exit 130; the same command completes the
    store, equal to an uninterrupted extraction."""
    args = [*_extract_args(stores, tmp_path / "out"), "--scheduler", "local:2"]
    process = subprocess.Popen(
        _cli("featcache", args), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    printed = []
    for got in process.stdout:
        printed.append(got)
        if "extract train 1/18" in got:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            break
    printed.append(process.stdout.read())
    status, output = process.wait(timeout=300), "".join(printed)
    assert status == 130, output
    url = str(next((tmp_path / "out" / "train").glob("*.zarr")))
    store = FeatureStore.open(url)
    marked = store.marked_shards()
    assert 1 <= len(marked) < 18, output
    assert _one_line(output, "Stopped by SIGINT") == (
        f"Stopped by SIGINT: {len(marked)} of 18 shards of {url} are complete (marked and "
        "kept); the same command resumes the rest."
    )
    assert not [f for f in store.verify() if "no completion marker" not in f]

    again = _run(_cli("featcache", args))
    assert again.returncode == 0, again.stdout + again.stderr
    assert FeatureStore.open(url).verify() == []
    reference = ExtractConfig(
        models=["dinov2-tiny"], data=store.attrs["dataset"]["source"],
        out=str(tmp_path / "reference"), layers=[2], split="train", shard_size=1, batch_size=1,
    )  # fmt: skip
    plan = plan_extraction(reference)
    run_extraction(plan)
    assert _chunks(url) == _chunks(plan.urls[0])
