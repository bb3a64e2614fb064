"""stitchtrain sweep: grids with baselines, resume after interruption, Dask cluster = sequence."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from conftest import extract_demo_stores
from typer.testing import CliRunner

import stitchtrain.studies.sweep.run as sweep_module
from cli.experiments_app import experiments_app
from featcache.errors import FeatcacheError
from stitchtrain.studies.sweep.config import load_sweep_config
from stitchtrain.studies.sweep.grid import plan_sweep
from stitchtrain.studies.sweep.results import read_results
from stitchtrain.studies.sweep.run import run_sweep

runner = CliRunner()
MODELS = ["dinov2-tiny", "siglip2-tiny"]
# columns that legitimately differ between two runs of the same grid
VOLATILE = ["seconds", "skipped"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A dir with data/, stores/{train,test}/ (2 tiny encoders, 3 classes x 8 images) and
    sweep.toml naming the train stores by paths relative to it."""
    root = tmp_path_factory.mktemp("sweep")
    urls = extract_demo_stores(
        root / "data", root / "stores", models=MODELS, layers=[1, 2, 3], shard_size=16
    )
    dinov2 = os.path.relpath(urls["dinov2-tiny", "train"], root)
    siglip2 = os.path.relpath(urls["siglip2-tiny", "train"], root)
    # position 5 is not in the stores: those points fail, and the others must not mind
    (root / "sweep.toml").write_text(
        f"""
dataset = "shapes"

[stores]
dinov2 = "{dinov2}"
siglip2 = {{ train = "{siglip2}", test = "{urls["siglip2-tiny", "test"]}" }}

[grid]
pairs = [["dinov2", "siglip2"]]
positions = [2, 5]
objectives = ["ffm"]

[fit]
lrs = [5e-3]
epochs = 1
patience = 1
"""
    )
    (root / "sweep.yaml").write_text(
        f"""
dataset: shapes
stores:
  dinov2: {dinov2}
  siglip2: {{train: {siglip2}, test: {urls["siglip2-tiny", "test"]}}}
grid:
  pairs: [[dinov2, siglip2]]
  positions: [2, 5]
  objectives: [ffm]
fit: {{lrs: [5.0e-3], epochs: 1, patience: 1}}
"""
    )
    return root


@pytest.fixture(scope="module")
def sequential(root):
    """The grid run in sequence through the CLI: (out dir, table)."""
    out = root / "sequential"
    result = runner.invoke(experiments_app, ["sweep", str(root / "sweep.toml"), "--out", str(out)])
    assert result.exit_code == 1, result.output  # the position-5 points failed
    assert "failed" in result.output and "results.parquet" in result.output
    return out, read_results(out)


def _stable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=VOLATILE).reset_index(drop=True)


def test_plan_adds_baselines_and_reads_toml_and_yaml(root):
    plan = plan_sweep(load_sweep_config(root / "sweep.toml"), base=root)
    kinds = pd.Series([p.kind for p in plan.points]).value_counts().to_dict()
    # 2 probes; 2 directions x 2 positions; 2 encoders self-stitched x 2 positions
    assert kinds == {"probe": 2, "stitch": 4, "self_stitch": 4}
    ids = [p.id for p in plan.points]
    assert "probe--dinov2--s0" in ids and "siglip2--dinov2--ffm--mlp--n2--s0" in ids
    assert "dinov2--dinov2--ffm--mlp--n5--s0" in ids
    stitch = next(p for p in plan.points if p.id == "dinov2--siglip2--ffm--mlp--n2--s0")
    assert os.path.isabs(stitch.config["source"]) and stitch.config["epochs"] == 1
    assert stitch.source_encoder == "dinov2-tiny" and stitch.dataset == "shapes"
    yaml_plan = plan_sweep(load_sweep_config(root / "sweep.yaml"), base=root)
    assert [p.id for p in yaml_plan.points] == ids
    assert [p.config for p in yaml_plan.points] == [p.config for p in plan.points]


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"grid": {"positions": [2], "objectives": ["xfm"]}}, "objectives in"),
        ({"fit": {"source": "x"}}, "Unknown key"),
        ({"grid": {"positions": [2], "pairs": [["dinov2", "clip"]]}}, "pairs of encoder keys"),
        ({"grid": {"objectives": ["ffm"]}}, "positions"),
    ],
)
def test_bad_configs_are_refused(root, edit, message):
    config = {**load_sweep_config(root / "sweep.toml"), **edit}
    with pytest.raises(FeatcacheError, match=message):
        plan_sweep(config, base=root)


def test_sequential_sweep_records_failures_and_metrics(sequential):
    out, table = sequential
    assert len(table) == 10 and list(table.id[:2]) == ["probe--dinov2--s0", "probe--siglip2--s0"]
    failed = table[table.status == "failed"]
    assert set(failed.position) == {5} and len(failed) == 4
    assert failed.error.str.contains("layers/5").all()
    ok = table[table.status == "ok"]
    assert len(ok) == 6 and ok.metric.between(0, 1).all()
    stitched = ok[ok.kind != "probe"]
    assert stitched.final_distance.notna().all() and stitched.layer_distance.notna().all()
    assert (stitched["config.objective"] == "ffm").all()
    for run_dir in ok.run_dir:
        assert (out / run_dir / "metrics.json").is_file()
        assert (out / run_dir / "sweep_point.json").is_file()
    assert _stable(pd.read_csv(out / "results.csv")).shape == _stable(table).shape


def test_interrupted_sweep_reruns_only_missing_points(root, sequential, monkeypatch):
    plan = plan_sweep(load_sweep_config(root / "sweep.toml"), base=root)
    out = root / "interrupted"
    calls = []
    real_fit = sweep_module.fit

    def interrupting_fit(config, progress=None, **kwargs):
        calls.append(config.out)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the sweep inside the second stitch run
        return real_fit(config, progress, **kwargs)

    monkeypatch.setattr(sweep_module, "fit", interrupting_fit)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, out)
    partial = read_results(out)
    assert set(partial.status) == {"ok"} and len(partial) == 3  # 2 probes + 1 stitch run

    calls.clear()
    monkeypatch.setattr(sweep_module, "fit", lambda config, progress=None, **kwargs: calls.append(
        config.out) or real_fit(config, progress, **kwargs))  # fmt: skip
    table = run_sweep(plan, out)
    # the finished stitch run is not run again; the other 7 stitch points are
    assert len(calls) == 7 and str(out / "runs" / partial.id[2]) not in calls
    assert table.skipped.sum() == 3
    pd.testing.assert_frame_equal(
        _stable(table), _stable(sequential[1]), check_exact=False, rtol=1e-4
    )
    calls.clear()
    run_sweep(plan, out)  # finished: only the failed points are tried again
    assert len(calls) == 4


def test_local_cluster_gives_the_sequential_table(root, sequential):
    from distributed import LocalCluster

    plan = plan_sweep(load_sweep_config(root / "sweep.toml"), base=root)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        table = run_sweep(plan, root / "cluster", scheduler=cluster.scheduler_address)
    pd.testing.assert_frame_equal(
        _stable(table), _stable(sequential[1]), check_exact=False, rtol=1e-4
    )
    assert pd.read_parquet(root / "cluster" / "results.parquet").shape == table.shape


def test_cli_dry_run_lists_points_and_bad_scheduler(root, sequential):
    out, _ = sequential
    result = runner.invoke(
        experiments_app, ["sweep", str(root / "sweep.yaml"), "--out", str(out), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "10 grid points" in result.output and "probe--siglip2--s0" in result.output
    plan = plan_sweep(load_sweep_config(root / "sweep.toml"), base=root)
    with pytest.raises(FeatcacheError, match="local:N"):
        run_sweep(plan, root / "bad", scheduler="cluster-please")


def test_a_sigterm_stopping_a_fit_stops_the_sweep(root, monkeypatch):
    """``FitStopped`` (SIGTERM: checkpoint written) is not a failed point: the sweep stops,
    and its re-run resumes that point."""
    from stitchtrain.train.config import FitStopped

    plan = plan_sweep(load_sweep_config(root / "sweep.toml"), base=root)
    calls = []

    def stopped_fit(config, progress=None, **kwargs):
        calls.append(config.out)
        raise FitStopped("Stopped by SIGTERM after epoch 1 of stage ffm, lr 0.005: ...")

    monkeypatch.setattr(sweep_module, "fit", stopped_fit)
    with pytest.raises(FitStopped):
        run_sweep(plan, root / "stopped")
    assert len(calls) == 1
