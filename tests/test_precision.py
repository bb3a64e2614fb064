"""Extraction precision: --precision fp32|bf16|fp16 (autocast, CPU autocast here), recorded in
the store and its id, and the measured error against fp32 on the first batch."""

from __future__ import annotations

import json
import os
from typing import get_args

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import extract_app as featcache_app
from cli.featcache_app import app
from featcache.demo_data import make_demo_dataset
from featcache.encoders.base import PRECISIONS
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import PRECISIONS as STORE_PRECISIONS
from featcache.store import FeatureStore, StoreMismatchError

runner = CliRunner()
LAYERS = [0, 3, 6]
BATCH = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("precision"), num_classes=2, per_class=5)


@pytest.fixture(scope="module")
def stores(manifest, tmp_path_factory) -> dict[str, FeatureStore]:
    """One dinov2-tiny float32 store per precision, all under one root."""
    out = tmp_path_factory.mktemp("stores")
    opened = {}
    for precision in ("fp32", "bf16", "auto"):
        config = ExtractConfig(
            models=["dinov2-tiny"],
            data=str(manifest),
            out=str(out),
            layers=LAYERS,
            split="train",
            shard_size=6,
            batch_size=BATCH,
            dtype="float32",  # no float16 rounding between the precisions' numbers
            precision=precision,
        )
        plan = plan_extraction(config)
        run_extraction(plan)
        opened[precision] = FeatureStore.open(plan.urls[0])
    return opened


def test_bf16_store_differs_within_bf16_tolerance_and_has_its_own_id(stores):
    exact, bf16 = stores["fp32"], stores["bf16"]
    assert exact.attrs["precision"] == "fp32" and bf16.attrs["precision"] == "bf16"
    assert exact.attrs["store_id"] != bf16.attrs["store_id"]
    assert exact.url != bf16.url
    for name in (*(f"layers/{n}" for n in LAYERS), "final", "pooled"):
        reference, values = exact.read(name), bf16.read(name)
        assert not np.array_equal(reference, values), name  # autocast really ran
        # bf16 keeps 8 significant bits (2**-8 relative per rounding); a few blocks of
        # rounding stay within a few percent of the typical magnitude
        scale = np.abs(reference).mean()
        assert np.abs(values - reference).mean() < 2e-2 * scale, name
        np.testing.assert_allclose(values, reference, atol=0.1 * scale, rtol=0.05, err_msg=name)


def test_auto_is_fp32_on_cpu_with_the_id_stores_always_had(stores):
    exact, auto = stores["fp32"], stores["auto"]
    assert auto.attrs["precision"] == "fp32"
    assert auto.attrs["store_id"] == exact.attrs["store_id"]


def test_precision_error_is_the_first_batch_difference(stores):
    exact, bf16 = stores["fp32"], stores["bf16"]
    assert exact.attrs["precision_error"]["max_abs"] == 0.0
    assert exact.attrs["precision_error"]["mean_abs"] == 0.0
    error = bf16.attrs["precision_error"]
    assert error["against"] == "fp32" and error["images"] == BATCH
    assert set(error["arrays"]) == set(bf16.feature_arrays())
    assert 0 < error["mean_abs"] < error["max_abs"]
    assert 1e-4 < error["mean_abs"] / error["mean_abs_fp32"] < 2e-2  # bf16's few 2**-8
    # the stored rows of the first batch (float32 stores: no storage rounding) show it exactly
    first = slice(0, BATCH)
    for name, measured in error["arrays"].items():
        difference = np.abs(bf16.read(name, first) - exact.read(name, first))
        np.testing.assert_allclose(difference.max(), measured["max_abs"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(difference.mean(), measured["mean_abs"], rtol=1e-4)
    worst = max(measured["max_abs"] for measured in error["arrays"].values())
    assert error["max_abs"] == worst


def test_cli_precision_option_and_info(tmp_path, manifest):
    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest), "--out", str(tmp_path)]
    args += ["--layers", "2", "--split", "test", "--shard-size", "4", "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    (store,) = tmp_path.glob("test/*.zarr")
    info = json.loads(runner.invoke(app, ["info", str(store), "--json"]).output)
    assert info["summary"]["precision"] == "bf16"
    assert info["summary"]["precision_error"]["max_abs"] > 0
    human = runner.invoke(app, ["info", str(store)]).output
    assert "bf16" in human and "max" in human
    refused = runner.invoke(app, [*args, "--precision", "fp64"])
    assert refused.exit_code == 2 and "fp64" in refused.output


def test_cli_precision_choices_are_the_library_ones():
    assert get_args(featcache_app.Precision) == ("auto", *PRECISIONS)
    assert STORE_PRECISIONS == PRECISIONS  # the zarr-only store module keeps its own copy


def test_other_precision_on_an_existing_store_is_refused_naming_it(stores, manifest):
    config = ExtractConfig(
        models=["dinov2-tiny"], data=str(manifest), out=stores["fp32"].url, layers=LAYERS,
        split="train", shard_size=6, batch_size=BATCH, dtype="float32", precision="bf16",
    )  # fmt: skip
    with pytest.raises(StoreMismatchError, match="precision fp32 \\(store\\) vs bf16"):
        run_extraction(plan_extraction(config))


def test_bad_precision_and_workers_default(manifest, tmp_path):
    with pytest.raises(FeatcacheError, match="--precision auto, fp32, bf16 or fp16. Got 'fp8'"):
        ExtractConfig(models=["dinov2-tiny"], data=str(manifest), out=str(tmp_path),
                      layers=[1], precision="fp8")  # fmt: skip
    config = ExtractConfig(models=["dinov2-tiny"], data=str(manifest), out=str(tmp_path),
                           layers=[1])  # fmt: skip
    assert config.num_workers == len(os.sched_getaffinity(0))
