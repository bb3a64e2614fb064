"""stitchtrain report: the paper's figures as PNGs and its tables, from a real (tiny) sweep."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import extract_demo_stores
from PIL import Image
from typer.testing import CliRunner

from cli.experiments_app import experiments_app
from stitchtrain.analysis import transfer_run
from stitchtrain.fit import FitConfig, fit
from stitchtrain.report import Table
from stitchtrain.sweep import load_sweep_config, plan_sweep, run_sweep

runner = CliRunner()
MODELS = ["dinov2-tiny", "siglip2-tiny"]


def _extract(root, name: str, seed: int) -> dict:
    return extract_demo_stores(
        root / name, root / f"stores-{name}", models=MODELS, layers=[2, 3], shard_size=16, seed=seed
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A sweep on "shapes" (LFM, FFM, FFM+TLT at positions 2 and 3, baselines) and a
    task-agnostic transfer: an FFM stitch trained on "other", applied to "shapes"."""
    root = tmp_path_factory.mktemp("report")
    shapes, other = _extract(root, "shapes", 0), _extract(root, "other", 1)
    (root / "sweep.toml").write_text(
        f"""
[stores]
dinov2 = "{os.path.relpath(shapes["dinov2-tiny", "train"], root)}"
siglip2 = "{os.path.relpath(shapes["siglip2-tiny", "train"], root)}"

[grid]
positions = [2, 3]
objectives = ["lfm", "ffm", "ffm+tlt"]

[fit]
lrs = [5e-3]
epochs = 2
patience = 2

[baselines]
self_stitch_objectives = ["ffm+tlt"]
"""
    )
    plan = plan_sweep(load_sweep_config(root / "sweep.toml"), base=root)
    table = run_sweep(plan, root / "sweep")
    assert (table.status == "ok").all(), table.error.dropna().tolist()
    agnostic = FitConfig(
        source=other["dinov2-tiny", "train"],
        target=other["siglip2-tiny", "train"],
        position=2,
        out=str(root / "other-ffm"),
        objective="ffm",
        lrs=(5e-3,),
        epochs=2,
    )
    fit(agnostic)
    transfer = transfer_run(
        root / "other-ffm",
        shapes["dinov2-tiny", "train"],
        shapes["siglip2-tiny", "train"],
        root / "transfers" / "other-to-shapes",
    )
    return {"root": root, "table": table, "transfer": transfer}


def _not_blank(path) -> None:
    image = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert image.shape[0] > 200 and image.shape[1] > 300, path
    assert image.std() > 5, path  # not one flat colour
    assert (image < 200).mean() > 0.01, path  # lines, markers and text drawn on it


def test_report_writes_figures_and_paper_tables(results, tmp_path):
    root = results["root"]
    out = tmp_path / "report"
    result = runner.invoke(
        experiments_app,
        ["report", str(root / "sweep"), str(root / "transfers"), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "shapes_accuracy_dinov2_to_siglip2.png",
        "shapes_accuracy_siglip2_to_dinov2.png",
        "shapes_cka_dinov2_siglip2.png",
        "shapes_cka_heatmap_dinov2_siglip2.png",
        "shapes_distance_dinov2_to_siglip2.png",
        "shapes_distance_siglip2_to_dinov2.png",
        "shapes_self_stitch_dinov2_siglip2.png",
    ]
    for name in pngs:
        _not_blank(out / name)
    page = (out / "index.html").read_text()
    assert sorted(re.findall(r"<img src='([^']+)'", page)) == pngs
    assert page.count("<table>") >= 8
    markdown = (out / "report.md").read_text()
    for title in ("Table 1 layout", "Table 2 layout", "Table 3 layout", "Table 4 layout"):
        assert title in markdown and title in page
    assert "Table 6 layout" in markdown and "Linear CKA" in markdown
    assert markdown.count("Table 12 layout") == 4  # 2 directions x 2 positions

    # Table 1: the FFM row of the first direction holds the sweep's FFM+TLT accuracies
    table = results["table"]
    expected = [
        f"{table[table.id == f'dinov2--siglip2--ffm-tlt--mlp--n{p}--s0'].metric.iloc[0] * 100:.1f}"
        for p in (2, 3)
    ]
    section = markdown[markdown.index("Table 1 layout") :]
    assert f"| FFM | {expected[0]} | {expected[1]} |" in section.split("\n\n")[1]
    # Table 4: T-Agn. is the transfer's accuracy on "shapes"
    row = next(line for line in markdown.splitlines() if line.startswith("| dinov2-tiny→siglip2"))
    assert f"{results['transfer']['test_accuracy'] * 100:.1f} |" in row


def test_report_without_cka_and_predictions(results, tmp_path):
    out = tmp_path / "plain"
    result = runner.invoke(
        experiments_app,
        [
            "report",
            str(results["root"] / "sweep"),
            "--out",
            str(out),
            "--no-cka",
            "--no-predictions",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*cka*")) and "Table 12" not in (out / "report.md").read_text()
    assert len(list(out.glob("*.png"))) == 5
    result = runner.invoke(experiments_app, ["report", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 2 and "results.parquet" in result.output


def test_table_renders_markdown_and_html():
    table = Table("T", ["a", "b|c"], [["**x**", "<1>"]], note="n")
    assert table.markdown().splitlines()[2:5] == [
        "| a | b\\|c |",
        "| --- | --- |",
        "| **x** | <1> |",
    ]
    assert "<td><b>x</b></td><td>&lt;1&gt;</td>" in table.html()
