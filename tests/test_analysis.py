"""Prediction analysis (paper Table 12) and task-agnostic stitching (Table 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import extract_demo_stores
from safetensors.torch import load_file
from typer.testing import CliRunner

import stitchtrain.studies.analysis as analysis_module
from cli.experiments_app import experiments_app
from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.evaluate.evaluation import load_run
from stitchtrain.pipeline.fit import fit
from stitchtrain.scoring.probe import probe_store
from stitchtrain.studies.analysis import count_scenarios, run_predictions, transfer_run
from stitchtrain.train.config import FitConfig

runner = CliRunner()
MODELS = ["dinov2-tiny", "siglip2-tiny"]


def _extract(root, name: str, seed: int) -> dict:
    return extract_demo_stores(
        root / name, root / f"stores-{name}", models=MODELS, layers=[2], shard_size=16, seed=seed
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stores of two datasets ("shapes", "other"), and on "shapes" at position 2: D->S with
    FFM+TLT and FFM, the two FFM+TLT self-stitches, and a linear probe of S."""
    root = tmp_path_factory.mktemp("analysis")
    stores = {"shapes": _extract(root, "shapes", 0), "other": _extract(root, "other", 1)}
    shapes = stores["shapes"]
    made = {"root": root, "stores": stores, "metrics": {}}
    for name, source, target, objective in [
        ("d-s-ffm-tlt", "dinov2-tiny", "siglip2-tiny", "ffm+tlt"),
        ("d-s-ffm", "dinov2-tiny", "siglip2-tiny", "ffm"),
        ("d-d-ffm-tlt", "dinov2-tiny", "dinov2-tiny", "ffm+tlt"),
        ("s-s-ffm-tlt", "siglip2-tiny", "siglip2-tiny", "ffm+tlt"),
    ]:
        config = FitConfig(
            source=shapes[source, "train"],
            target=shapes[target, "train"],
            position=2,
            out=str(root / "runs" / name),
            objective=objective,
            lrs=(5e-3,),
            epochs=2,
            patience=2,
        )
        made["metrics"][name] = fit(config)
    made["metrics"]["probe-s"] = probe_store(
        shapes["siglip2-tiny", "train"], root / "runs" / "probe-s", lrs=(5e-3,), epochs=5
    )
    return made


def test_scenario_counts_on_a_hand_made_case():
    # (label, baseline A, baseline B, stitched) per image, and how many such images
    cases = [
        ((0, 1, 0, 0), 3),  # WRR preserve; A and B disagree, stitched follows B
        ((0, 0, 2, 0), 2),  # RWR preserve; follows A
        ((0, 1, 2, 0), 1),  # WWR rescue; neither
        ((0, 0, 0, 1), 1),  # RRW interference
        ((0, 0, 2, 2), 2),  # RWW interference; follows B
        ((0, 1, 0, 1), 1),  # WRW interference; follows A
        ((0, 0, 0, 0), 4),  # RRR: trivial
        ((0, 1, 2, 3), 1),  # WWW: trivial; neither
        ((0, 1, 1, 1), 1),  # WWW: trivial; A and B agree
        ((-1, 0, 0, 0), 1),  # invalid label row: left out
        ((0, -1, 0, 0), 1),  # invalid prediction row: left out
    ]
    rows = np.array([case for case, count in cases for _ in range(count)])
    rows = rows[np.random.default_rng(0).permutation(len(rows))]  # order must not matter
    result = count_scenarios(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3])
    assert [c["pattern"] for c in result["columns"]] == ["WRR", "RWR", "WWR", "RRW", "RWW", "WRW"]
    assert [c["count"] for c in result["columns"]] == [3, 2, 1, 1, 2, 1]
    assert (result["preserve"], result["rescue"], result["interference"]) == (5, 1, 4)
    assert (result["all_right"], result["all_wrong"], result["images"]) == (4, 2, 16)
    assert result["accuracy"]["a"] == pytest.approx(9 / 16)
    assert result["accuracy"]["b"] == pytest.approx(9 / 16)
    assert result["accuracy"]["s"] == pytest.approx(10 / 16)
    assert result["disagreements"] == {"images": 10, "follows_a": 3, "follows_b": 5, "neither": 2}
    with pytest.raises(FeatcacheError, match="row-aligned"):
        count_scenarios(rows[:3, 0], rows[:, 1], rows[:, 2], rows[:, 3])


@pytest.mark.parametrize("name", ["d-s-ffm-tlt", "d-s-ffm", "probe-s"])
def test_predictions_reproduce_the_evaluated_accuracy(runs, name, monkeypatch):
    run_dir = runs["root"] / "runs" / name
    predictions = run_predictions(run_dir)
    test = FeatureStore.open(json.loads((run_dir / "predictions.json").read_text())["test_store"])
    assert test.attrs["dataset"]["split"] == "test"
    assert predictions.shape == (test.num_images,) and predictions.dtype == np.int64
    valid = test.read("valid")
    assert (predictions[~valid] == -1).all() and (predictions[valid] >= 0).all()
    accuracy = (predictions[valid] == test.read("labels")[valid]).mean()
    assert accuracy == pytest.approx(runs["metrics"][name]["test_accuracy"])

    def no_recompute(*args):
        raise AssertionError("predictions.npy should have been reused")

    monkeypatch.setattr(analysis_module, "_stitched_predictions", no_recompute)
    monkeypatch.setattr(analysis_module, "_probe_predictions", no_recompute)
    np.testing.assert_array_equal(run_predictions(run_dir), predictions)


def test_cli_predictions_counts_against_self_stitches(runs):
    base = runs["root"] / "runs"
    result = runner.invoke(
        experiments_app,
        [
            "predictions",
            str(base / "d-s-ffm-tlt"),
            str(base / "d-d-ffm-tlt"),
            str(base / "s-s-ffm-tlt"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert counts["stitched"] == "dinov2-tiny→siglip2-tiny"
    assert counts["baseline_a"] == "dinov2-tiny→dinov2-tiny"
    columns = sum(c["count"] for c in counts["columns"])
    assert columns + counts["all_right"] + counts["all_wrong"] == counts["images"] == 6
    assert counts["preserve"] + counts["rescue"] + counts["interference"] == columns
    metrics = runs["metrics"]
    assert counts["accuracy"]["s"] == pytest.approx(metrics["d-s-ffm-tlt"]["test_accuracy"])
    assert counts["accuracy"]["b"] == pytest.approx(metrics["s-s-ffm-tlt"]["test_accuracy"])
    result = runner.invoke(
        experiments_app,
        ["predictions", str(base / "d-s-ffm-tlt"), str(base / "d-d-ffm-tlt"), str(base)],
    )
    assert result.exit_code == 2 and "config.json" in result.output


def test_transfer_applies_the_ffm_stitch_to_another_dataset(runs, tmp_path):
    other = runs["stores"]["other"]
    run_dir = runs["root"] / "runs" / "d-s-ffm"
    result = runner.invoke(
        experiments_app,
        [
            "transfer",
            str(run_dir),
            "--source",
            other["dinov2-tiny", "train"],
            "--target",
            other["siglip2-tiny", "train"],
            "--out",
            str(tmp_path / "t"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["evaluation"] == "linear_probe"
    assert (metrics["dataset"], metrics["trained_on"]) == ("other", "shapes")
    assert metrics["test_target"] == other["siglip2-tiny", "test"] and metrics["test_images"] == 6
    assert metrics["encoders_checked"] and metrics["position"] == 2
    assert json.loads((tmp_path / "t" / "transfer.json").read_text())["run_dir"] == str(run_dir)
    # Figure 2's distances on the new dataset, measured in the probe's scoring pass: equal to
    # a plain computation over the whole test arrays (RMS token distance, l2 of pooled)
    recipe = load_run(run_dir, source=other["dinov2-tiny", "train"],
                      target=other["siglip2-tiny", "train"], out=str(tmp_path / "t"))  # fmt: skip
    recipe.stitch.load_state_dict(load_file(str(run_dir / "stitch-ffm.safetensors")))
    source = FeatureStore.open(other["dinov2-tiny", "test"]).group
    target = FeatureStore.open(other["siglip2-tiny", "test"]).group
    arrays = {name: torch.from_numpy(np.asarray(target[name][:], np.float32))
              for name in ("layers/2", "final", "pooled")}  # fmt: skip
    tokens = torch.from_numpy(np.asarray(source["layers/2"][:], np.float32))
    with torch.no_grad():
        final, pooled = recipe.stitched_outputs(tokens)
        layer = recipe.stitch(tokens)

    def rms(a, b):
        return float(((a - b).pow(2).sum((1, 2)) / a.shape[1]).sqrt().mean())

    assert metrics["layer_distance"] == pytest.approx(rms(layer, arrays["layers/2"]), rel=1e-5)
    assert metrics["final_distance"] == pytest.approx(rms(final, arrays["final"]), rel=1e-5)
    want = float((pooled - arrays["pooled"]).norm(dim=-1).mean())
    assert metrics["pooled_distance"] == pytest.approx(want, rel=1e-5)


def test_transfer_refusals(runs, tmp_path):
    other = runs["stores"]["other"]
    swapped = (other["siglip2-tiny", "train"], other["dinov2-tiny", "train"])
    with pytest.raises(FeatcacheError, match="trained on dinov2-tiny"):
        transfer_run(runs["root"] / "runs" / "d-s-ffm", *swapped, tmp_path / "a")
    no_ffm = tmp_path / "lfm-run"
    no_ffm.mkdir()
    config = json.loads((runs["root"] / "runs" / "d-s-ffm" / "config.json").read_text())
    (no_ffm / "config.json").write_text(json.dumps({**config, "objective": "lfm"}))
    with pytest.raises(FeatcacheError, match="stitch-ffm"):
        transfer_run(no_ffm, *swapped[::-1], tmp_path / "b")
