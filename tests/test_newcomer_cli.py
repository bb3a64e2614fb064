"""What a newcomer hits in the first hour (issue 23): the default ``--layers`` of a model that
is not 24 blocks deep, timm-style layer indices, ``stitchtrain positions`` on stores, one epoch
convention in the console and the run dir's files.

Real tiny models (6 blocks), a real demo dataset of a few images and real stores throughout.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app

runner = CliRunner()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from featcache.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("images"), num_classes=2, per_class=2)


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())  # rich boxes wrap long lines


# -- point 2: the default --layers, negative indices, all ----------------------------------------
def test_default_layers_follow_the_depth():
    from featcache.extract.layers import default_layers

    assert default_layers(24) == (2, 6, 10, 14, 18, 22, 24)  # the paper's, unchanged
    assert default_layers(12) == (1, 3, 5, 7, 9, 11, 12)
    assert default_layers(6) == (1, 2, 3, 4, 5, 6)
    assert default_layers(2) == (1, 2)


def test_extract_without_layers_fits_a_six_block_model(tmp_path, manifest):
    from featcache.store import FeatureStore

    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest)]
    args += ["--out", str(tmp_path / "out"), "--split", "train", "--json"]
    result = runner.invoke(featcache_app, args)
    assert result.exit_code == 0, result.output
    (store,) = (tmp_path / "out" / "train").glob("*.zarr")
    assert list(FeatureStore.open(str(store)).layers) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "typed, layers",
    [("-1", (6,)), ("2,-1,-2", (2, 5, 6)), ("-6,0", (0, 1)), ("all", (0, 1, 2, 3, 4, 5, 6))],
)
def test_negative_indices_and_all_resolve_per_model(tmp_path, manifest, typed, layers):
    from featcache.extract import ExtractConfig, plan_extraction

    config = ExtractConfig(
        models=["dinov2-tiny"], data=str(manifest), out=str(tmp_path), layers=typed
    )
    assert plan_extraction(config).specs[0].layers == layers


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("2,7", "Expected --layers in 0..6 or -6..-1 (-1: the last block), or all, for "
         "dinov2-tiny (depth 6). Got 7 in --layers '2,7' instead."),
        ("-7", "Got -7 in --layers '-7' instead."),
    ],
)  # fmt: skip
def test_layers_out_of_range_name_what_was_typed(tmp_path, manifest, typed, expected):
    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest)]
    args += ["--out", str(tmp_path / "out"), f"--layers={typed}"]
    result = runner.invoke(featcache_app, args)
    assert result.exit_code == 2, result.output
    assert expected in _flat(result.output)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("typed", ["2,x", "all,2", ",,", "1.5"])
def test_layers_not_understood_say_what_is_accepted(tmp_path, manifest, typed):
    args = ["extract", "--model", "dinov2-tiny", "--data", str(manifest)]
    args += ["--out", str(tmp_path / "out"), f"--layers={typed}"]
    result = runner.invoke(featcache_app, args)
    assert result.exit_code == 2, result.output
    flat = _flat(result.output)
    assert f"Got {typed!r} instead" in flat and "all" in flat and "-1" in flat, flat


# -- point 8: stitchtrain positions takes stores --------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory, manifest):
    """dinov2-tiny and clip-tiny (6 blocks each) train stores holding layers 2, 4 and 6 only."""
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    out = tmp_path_factory.mktemp("stores")
    config = ExtractConfig(
        models=["dinov2-tiny", "clip-tiny"], data=str(manifest), out=str(out), layers=[2, 4, 6]
    )
    plan = plan_extraction(config)
    run_extraction(plan)
    return dict(zip(config.models, plan.urls, strict=True))


@pytest.mark.parametrize(
    "options, allowed",
    [
        ([], "2, 4"),  # fit's defaults: ffm+tlt, mlp stitch
        (["--objective", "lfm"], "2, 4"),
        (["--stitch", "lora"], "3, 5"),  # LoRA at n reads source layer n-1
    ],
)
def test_positions_of_stores_are_those_their_layers_allow(stores, options, allowed):
    from cli.stitchtrain_app import app

    args = ["positions", stores["dinov2-tiny"], stores["clip-tiny"], *options]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    flat = _flat(result.output)
    assert "stitch positions: 1..5" in flat, flat
    assert f"these stores allow: {allowed}" in flat, flat


def test_fit_accepts_exactly_the_positions_that_positions_lists(stores):
    from featcache.store import FeatureStore
    from stitchtrain.data.pairing import PairingError, check_pair, usable_positions

    source, target = (FeatureStore.open(stores[m]) for m in ("dinov2-tiny", "clip-tiny"))
    usable = usable_positions(source, target, stitch="mlp", objective="ffm+tlt")
    assert usable == [2, 4]
    for position in range(1, 6):
        if position in usable:
            check_pair(
                source, target, position=position, stitch="mlp", objective="ffm+tlt", task="cls"
            )
        else:
            with pytest.raises(PairingError, match="these stores allow: 2, 4"):
                check_pair(
                    source, target, position=position, stitch="mlp", objective="ffm+tlt", task="cls"
                )


def test_positions_of_encoder_names_still_work():
    from cli.stitchtrain_app import app

    result = runner.invoke(app, ["positions", "dinov2-tiny", "clip-tiny"])
    assert result.exit_code == 0, result.output
    assert "stitch positions: 1..5" in result.output


def test_positions_refuses_a_store_with_an_encoder_name(stores):
    from cli.stitchtrain_app import app

    result = runner.invoke(app, ["positions", stores["dinov2-tiny"], "clip-tiny"])
    assert result.exit_code == 2, result.output
    flat = _flat(result.output)
    assert "Expected two stores or two encoder names" in flat and "'clip-tiny'" in flat, flat
    assert "Traceback" not in result.output


# -- point 4: one epoch convention ----------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """dinov2-tiny and siglip2-tiny train and test stores of layer 2 (2 classes, 6 images each)."""
    from conftest import extract_demo_stores

    root = tmp_path_factory.mktemp("pair")
    models = ["dinov2-tiny", "siglip2-tiny"]
    return extract_demo_stores(
        root / "data", root / "stores", models=models, layers=[2], shard_size=8,
        num_classes=2, per_class=6,
    )  # fmt: skip


def test_epochs_count_from_one_in_console_json_metrics_and_history(pair, tmp_path):
    import csv
    import json
    import re

    from cli.stitchtrain_app import app

    out = tmp_path / "run"
    args = ["fit", "--source", pair["dinov2-tiny", "train"], "--target"]
    args += [pair["siglip2-tiny", "train"], "--position", "2", "--out", str(out)]
    args += ["--objective", "ffm+tlt", "--lr", "1e-3,5e-2", "--epochs", "4", "--patience", "1"]
    args += ["--batch-size", "4", "--val-fraction", "0.25", "--device", "cpu", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    said = re.findall(r"\((\S+)\) done, \d+/4 epochs(?: \(early stop\))?, best epoch (\d+)",
                      result.stderr)  # fmt: skip
    best = []
    for stage in ("ffm", "tlt"):
        for printed_lr, written_lr in zip(
            printed["stages"][stage]["grid"], metrics["stages"][stage]["grid"], strict=True
        ):
            assert printed_lr["best_epoch"] == written_lr["best_epoch"]
            rows = [
                r for r in history if r["stage"] == stage and float(r["lr"]) == printed_lr["lr"]
            ]
            epochs = [int(r["epoch"]) for r in rows]
            assert epochs == list(range(1, len(rows) + 1)), (stage, epochs)
            lowest = min(rows, key=lambda r: float(r["val_loss"]))  # the first of equal losses
            assert int(lowest["epoch"]) == printed_lr["best_epoch"], (stage, printed_lr)
            best.append((f"{printed_lr['lr']:g}", str(printed_lr["best_epoch"])))
    assert said == best, result.stderr


def test_a_checkpoint_counting_epochs_from_zero_is_refused_and_the_restart_matches(pair, tmp_path):
    """A checkpoint written before epochs counted from 1 (history rows from 0, best epochs from
    0; no digest, no config: the writer before run-dir digests) is refused in one line naming
    the files to remove; removed as told, the run ends as an uninterrupted run of this version."""
    import json
    import shutil

    from conftest import history_without_timing

    from featcache.errors import FeatcacheError
    from stitchtrain.pipeline.fit import StitchRecipe, fit
    from stitchtrain.train.config import FitConfig

    class Snapshotting(StitchRecipe):  # the run dir after each checkpoint write
        count = 0

        def _save_checkpoint(self, *args, **kwargs):
            super()._save_checkpoint(*args, **kwargs)
            Snapshotting.count += 1
            shutil.copytree(self.out, tmp_path / f"k{Snapshotting.count}")

    config = FitConfig(
        source=pair["dinov2-tiny", "train"],
        target=pair["siglip2-tiny", "train"],
        position=2,
        out=str(tmp_path / "run"),
        objective="ffm+tlt",
        lrs=(1e-3, 5e-2),
        epochs=2,
        patience=2,
        batch_size=4,
        val_fraction=0.25,
        device="cpu",
    )
    Snapshotting(config, checkpoint_every=0).run()
    want = history_without_timing(tmp_path / "run")
    want_metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())

    def inside_tlt_second_lr(k: int) -> bool:
        record = json.loads((tmp_path / f"k{k}" / "checkpoint.json").read_text())
        state = record["state"]  # stage tlt, its second lr, one epoch done
        return (record["stage_index"], state["lr_index"], state["epoch"]) == (1, 1, 1)

    (k,) = [k for k in range(1, Snapshotting.count + 1) if inside_tlt_second_lr(k)]
    shutil.rmtree(tmp_path / "run")
    shutil.copytree(tmp_path / f"k{k}", tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.json"
    record = json.loads(path.read_text())  # as the writer before this version wrote it
    for row in record["history"]:
        row["epoch"] -= 1
    grids = [record["state"]["finished"], *(r["grid"] for r in record["stage_results"].values())]
    for grid in grids:
        for result in grid:
            result["best_epoch"] -= 1
    record["state"]["best_epoch"] -= 1
    del record["digest"], record["config"]
    path.write_text(json.dumps(record))
    with pytest.raises(FeatcacheError, match="checkpoint.json") as refused:
        fit(config)
    assert "\n" not in str(refused.value) and "remove" in str(refused.value).lower()
    for name in [path.name, *(p.name for p in path.parent.glob("checkpoint-*.safetensors"))]:
        (path.parent / name).unlink()
    assert fit(config) == want_metrics
    assert history_without_timing(tmp_path / "run") == want


def test_a_stage_record_counting_epochs_from_zero_is_trained_again(pair, tmp_path):
    import json

    from stitchtrain.pipeline.fit import fit
    from stitchtrain.train.config import FitConfig

    def config(out: str) -> FitConfig:
        return FitConfig(
            source=pair["dinov2-tiny", "train"],
            target=pair["siglip2-tiny", "train"],
            position=2,
            out=str(tmp_path / out),
            objective="ffm",
            lrs=(1e-3,),
            epochs=1,
            batch_size=4,
            val_fraction=0.25,
            device="cpu",
        )

    fit(config("first"))
    taken = fit(config("taken"), reuse=[tmp_path / "first"])
    assert taken["stages"]["ffm"]["reused_from"] == str(tmp_path / "first")
    path = tmp_path / "first" / "stage-ffm.json"
    record = json.loads(path.read_text())
    for row in record["history"]:  # as the writer before this version wrote it
        row["epoch"] -= 1
    path.write_text(json.dumps(record))
    trained = fit(config("trained"), reuse=[tmp_path / "first"])
    assert "reused_from" not in trained["stages"]["ffm"]
    assert trained["stages"]["ffm"]["grid"][0]["best_epoch"] == 1


def test_probe_history_counts_epochs_from_one():
    import torch

    from stitchtrain.scoring.probe import fit_linear_probe

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 5, generator=generator)
    labels = torch.arange(12) % 3
    result = fit_linear_probe(
        features[:8], labels[:8], features[8:], labels[8:], num_classes=3, lrs=(1e-2,),
        epochs=3, patience=3,
    )  # fmt: skip
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    lowest = min(result.history, key=lambda row: row["val_loss"])
    assert result.epochs == lowest["epoch"]  # the epoch the chosen head is from
