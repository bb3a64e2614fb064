"""Issue 23 (a newcomer's first hour), points 5, 6 and 10 on reports, sweeps and ``ls``:
where ``report --out`` may write and that it writes atomically; n, 95% intervals and
below-chance marks on small samples; the report's polish."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import write_sweep_dir
from typer.testing import CliRunner

from cli.experiments_app import experiments_app
from stitchtrain.studies.report.page import build_report

runner = CliRunner()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return write_sweep_dir(tmp_path_factory.mktemp("newcomer") / "sweep")


# -- point 6: report --out ----------------------------------------------------------------------
def test_report_refuses_a_dataset_folder_and_writes_nothing_there(sweep_dir, tmp_path):
    data = tmp_path / "shapes"
    for name in ("circle", "square"):
        (data / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / name / "01.png")
    before = _tree(data)
    result = runner.invoke(
        experiments_app,
        ["report", str(sweep_dir), "--out", str(data), "--no-cka", "--no-predictions"],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert f"report folder {data}" in message and "circle, square" in message
    assert "choose another --out" in message
    assert _tree(data) == before  # not one file dropped there
    assert os.listdir(tmp_path) == ["shapes"]  # and no temp folder beside it


def test_report_refuses_a_folder_with_other_files_beside_a_report(sweep_dir, tmp_path):
    out = tmp_path / "report"
    build_report([sweep_dir], out, cka=False, predictions=False)
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(
        experiments_app,
        ["report", str(sweep_dir), "--out", str(out), "--no-cka", "--no-predictions"],
    )
    assert result.exit_code == 2, result.output
    assert "notes.txt" in result.output
    assert (out / "notes.txt").read_text() == "mine"


def test_rewriting_a_report_replaces_it_whole(sweep_dir, tmp_path):
    out = tmp_path / "report"
    out.mkdir()  # an empty folder is fine
    build_report([sweep_dir], out, cka=False, predictions=False)
    (out / "shapes_accuracy_old_to_gone.png").write_bytes(b"stale")  # an earlier report's plot
    (out / "shapes_accuracy_old_to_gone.csv").write_text("stale")
    result = runner.invoke(
        experiments_app,
        ["report", str(sweep_dir), "--out", str(out), "--no-cka", "--no-predictions"],
    )
    assert result.exit_code == 0, result.output
    assert not (out / "shapes_accuracy_old_to_gone.png").exists()
    assert (out / "index.html").is_file() and (out / "report.md").is_file()
    assert sorted(os.listdir(tmp_path)) == ["report"]  # no temp or old folder left


def test_a_failed_report_leaves_the_earlier_one_untouched(sweep_dir, tmp_path):
    out = tmp_path / "report"
    build_report([sweep_dir], out, cka=False, predictions=False)
    (out / "shapes_accuracy_dinov2_to_siglip2.png").write_bytes(b"the earlier report's plot")
    before = _tree(out)

    def progress(step: str, done: int, total: int) -> None:
        if step == "pages":
            raise KeyboardInterrupt  # stopped while the new report is half written

    with pytest.raises(KeyboardInterrupt):
        build_report([sweep_dir], out, cka=False, predictions=False, progress=progress)
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["report"]


# -- point 5: n, 95% intervals, below chance ------------------------------------------------------
def test_wilson_interval_matches_hand_computed_values():
    from stitchtrain.scoring.intervals import wilson_interval

    # p = 0.8, z = 1.95996: centre (0.8 + z²/20) / (1 + z²/10), half z·sqrt(0.016 + z²/400) / ...
    assert [round(v, 3) for v in wilson_interval(8, 10)] == [0.490, 0.943]
    assert [round(v, 3) for v in wilson_interval(2, 3)] == [0.208, 0.939]
    assert [round(v, 3) for v in wilson_interval(0, 10)] == [0.0, 0.278]
    assert [round(v, 3) for v in wilson_interval(10, 10)] == [0.722, 1.0]
    with pytest.raises(ValueError, match="Expected successes in 0..10. Got 11 instead"):
        wilson_interval(11, 10)


def test_below_chance_needs_the_upper_bound_below_one_over_classes():
    from stitchtrain.scoring.intervals import below_chance

    assert not below_chance(1, 12, 3)  # 8.3% on 12 images: upper bound 0.354 > 1/3
    assert below_chance(3, 36, 3)  # 8.3% on 36 images: upper bound 0.218 < 1/3
    assert not below_chance(12, 36, 3)  # at chance


def test_miou_bootstrap_is_seeded_and_brackets_the_score():
    import torch

    from stitchtrain.scoring.intervals import ImageIoU
    from stitchtrain.scoring.metrics import ConfusionMatrix

    rng = np.random.default_rng(0)
    confusion = ConfusionMatrix(3)
    images = ImageIoU(confusion)
    for _ in range(20):
        truth = torch.from_numpy(rng.integers(-1, 3, (6, 6)))
        predicted = torch.where(torch.rand(6, 6) < 0.7, truth.clamp(min=0), 2)
        images.update(predicted, truth)
    miou = confusion.miou()
    low, high = images.interval("mmseg", seed=0)
    assert low < miou < high and low > 0 and high < 1
    assert images.interval("mmseg", seed=0) == (low, high)  # seeded
    assert images.interval("mmseg", seed=1) != (low, high)
    one = ImageIoU(ConfusionMatrix(3))  # one image: every resample is that image
    one.update(predicted, truth)
    assert one.interval("mmseg", seed=0) == pytest.approx((one.confusion.miou(),) * 2)


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory) -> dict:
    from conftest import extract_demo_stores

    root = tmp_path_factory.mktemp("tiny")
    return extract_demo_stores(
        root / "data",
        root / "stores",
        models=["dinov2-tiny", "clip-tiny"],
        layers=[2],
        shard_size=16,
        per_class=4,
    )


@pytest.mark.parametrize("objective", ["tlt", "lfm"])  # the trained head; a linear probe
def test_metrics_json_records_n_and_the_wilson_interval(tiny_stores, tmp_path, objective):
    import json

    from conftest import pair_fit_config

    from stitchtrain.pipeline.fit import fit
    from stitchtrain.scoring.intervals import wilson_interval

    config = pair_fit_config(tiny_stores, tmp_path / "run", objective=objective, epochs=1)
    fit(config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    interval = metrics["test_interval"]
    n = metrics["test_images"]
    correct = round(metrics["test_accuracy"] * n)
    assert interval["metric"] == "test_accuracy" and interval["n"] == n > 0
    assert (interval["low"], interval["high"]) == pytest.approx(wilson_interval(correct, n))
    assert interval["level"] == 0.95 and interval["method"] == "wilson"
    assert interval["chance"] == pytest.approx(1 / 3)
    assert interval["below_chance"] == (interval["high"] < 1 / 3)


def _one_seed_sweep(root: Path) -> Path:
    """write_sweep_dir's runs, seed 0 only, each on 36 test images with its Wilson interval as
    run_sweep records it; siglip2→dinov2 LFM at position 3 at 3/36, below chance on 3 classes."""
    import pandas as pd

    from stitchtrain.scoring.intervals import below_chance, wilson_interval

    directory = write_sweep_dir(root / "full")
    frame = pd.read_parquet(directory / "results.parquet")
    frame = frame[frame.seed == 0].reset_index(drop=True)
    low = (frame.kind == "stitch") & (frame.source == "siglip2") & (frame.objective == "lfm")
    frame.loc[low & (frame.position == 3), "metric"] = 3 / 36
    correct = (frame.metric * 36).round().astype(int)
    frame["metric_n"] = 36
    frame["metric_low"] = [wilson_interval(k, 36)[0] for k in correct]
    frame["metric_high"] = [wilson_interval(k, 36)[1] for k in correct]
    frame["below_chance"] = [below_chance(k, 36, 3) for k in correct]
    sweep = root / "sweep"
    sweep.mkdir()
    frame.to_parquet(sweep / "results.parquet")
    return sweep


def test_report_tables_show_n_the_interval_and_below_chance(tmp_path):
    from stitchtrain.scoring.intervals import wilson_interval

    out = tmp_path / "report"
    build_report([_one_seed_sweep(tmp_path)], out, cka=False, predictions=False)
    markdown = (out / "report.md").read_text()
    for title in ("Table 1 layout", "Table 6 layout", "Table 3 layout", "Table 2 layout"):
        table = markdown[markdown.index(title) :].split("\n\n**")[0]
        assert "Each value rests on n = 36 test images" in table, title
        assert "95% interval (Wilson for accuracy, bootstrap over images for mIoU)" in table
    low, high = wilson_interval(30, 36)  # the siglip2 probe: 82.5 % of 36 images, k = 30
    table6 = markdown[markdown.index("Table 6 layout") :].split("\n\n**")[0]
    assert f"| siglip2 linear probe | 82.5 [{low * 100:.1f}–{high * 100:.1f}] |" in table6
    assert "| siglip2→dinov2 LFM | 60.0 [" in table6
    low, high = wilson_interval(3, 36)
    assert f"8.3 [{low * 100:.1f}–{high * 100:.1f}] ▼ |" in table6
    assert "▼: significantly below chance" in table6
    assert "▼" in (out / "index.html").read_text()


def test_report_plots_draw_the_intervals_as_error_bars(tmp_path):
    import pandas as pd

    out = tmp_path / "report"
    sweep = _one_seed_sweep(tmp_path)
    build_report([sweep], out, cka=False, predictions=False)
    runs = pd.read_parquet(sweep / "results.parquet")
    data = pd.read_csv(out / "shapes_accuracy_siglip2_to_dinov2.csv")
    lfm = data[data.series == "LFM"].set_index("x")
    run = runs[(runs.source == "siglip2") & (runs.objective == "lfm") & (runs.kind == "stitch")]
    for _, row in run.iterrows():
        assert lfm.y_low[row.position] == pytest.approx(row.metric_low * 100)
        assert lfm.y_high[row.position] == pytest.approx(row.metric_high * 100)
    assert data[data.series.str.endswith(" probe")].y_low.isna().all()  # lines, not points
    selfs = pd.read_csv(out / "shapes_self_stitch_dinov2_siglip2.csv")
    assert selfs.y_low.notna().all() and (selfs.y_low < selfs.y).all()


def test_fit_warns_of_a_tiny_validation_split_and_shows_n_and_the_interval(tiny_stores, tmp_path):
    import json

    from cli.stitchtrain_app import app

    args = ["fit", "--source", tiny_stores["dinov2-tiny", "train"]]
    args += ["--target", tiny_stores["clip-tiny", "train"], "--position", "2"]
    args += ["--out", str(tmp_path / "run"), "--objective", "tlt", "--lr", "1e-3,5e-3"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    output = " ".join(result.output.replace("│", " ").split())
    rows = metrics["val_rows"]
    assert rows < 30
    chosen = metrics["stages"]["tlt"]["lr"]
    assert (
        f"warning: tlt chose lr {chosen:g} of 0.001, 0.005 on {rows} validation rows (under 30: "
        "the choice may be chance); rule: higher validation metric, then lower validation loss, "
        "then the earlier rate of the grid"
    ) in output
    grid = metrics["stages"]["tlt"]["grid"]
    tied = grid[0]["val_metric"] == grid[1]["val_metric"]
    assert ("The val metric tied at" in output) == tied
    interval = metrics["test_interval"]
    assert f"test_accuracy n {interval['n']} test images" in output
    assert (
        f"test_accuracy 95% interval [{interval['low']:.4f}, {interval['high']:.4f}] (wilson)"
        in output
    )
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    again = runner.invoke(app, [*args, "--epochs", "1", "--batch-size", "8"])
    assert "warning: tlt chose lr" in again.output  # said again, numbers unchanged
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before


# -- point 10: polish -----------------------------------------------------------------------------
def test_report_runs_table_says_status_in_words_names_the_metric_and_aligns_names(tmp_path):
    out = tmp_path / "report"
    build_report([_one_seed_sweep(tmp_path)], out, cka=False, predictions=False)
    markdown = (out / "report.md").read_text()
    assert "Status: {" not in markdown
    assert "18 runs: 18 ok" in markdown
    runs = markdown[markdown.index("**All runs**") :]
    assert "| dataset | run | status | test metric | value (%) | n | 95% interval | error |" in runs
    assert "| accuracy | 8.3 | 36 | " in runs
    page = (out / "index.html").read_text()
    assert '<td class="text">stitch--dinov2--siglip2--lfm--n2--s0</td>' in page
    assert '<th class="text">run</th>' in page


def test_sweep_results_name_the_metric_and_end_with_a_table(tmp_path):
    from rich.console import Console

    from cli.experiments_app import _metric_text, _results_table
    from stitchtrain.studies.sweep.results import read_results

    frame = read_results(_one_seed_sweep(tmp_path))
    row = frame[frame.metric == 3 / 36].iloc[0].to_dict()
    text = _metric_text(row)
    assert text.startswith("test accuracy 0.0833 [0.0287, 0.2183] (n=36)"), text
    assert _metric_text({**row, "task": "seg"}).startswith("test mIoU 0.0833")
    console = Console(record=True, width=200)
    console.print(_results_table(frame))
    shown = console.export_text()
    assert "sweep results" in shown and row["id"] in shown and text in shown
