"""Issue 23 (a newcomer's first hour), the rest of point 10 (polish): the CKA heatmap's scale,
values, layers and names; plots as wide as the report page; ``featcache ls`` (skipped images,
a folder with no stores); a re-run of a finished ``fit``; the missing-weights hint; and a
report with CKA on results that name no stores."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import extract_demo_stores, folder_with_unreadable_images
from PIL import Image
from test_report import assert_figures_equal_tables, write_sweep_dir
from typer.testing import CliRunner

from cli.experiments_app import experiments_app
from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from stitchtrain.studies.cka import CKAResult, cka_heatmap
from stitchtrain.studies.report.page import build_report

runner = CliRunner()
MODELS = ["dinov2-tiny", "siglip2-tiny"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, dict]:
    """Both tiny encoders' train and test stores of 3 classes x 4 images, layers 1, 2, 3."""
    root = tmp_path_factory.mktemp("polish")
    urls = extract_demo_stores(
        root / "data", root / "stores", models=MODELS, layers=[1, 2, 3], shard_size=16, per_class=4
    )
    return root, urls


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- the CKA heatmap ------------------------------------------------------------------------------
def _result(values: list[list[float]], layers: list[str]) -> CKAResult:
    return CKAResult(
        store_a="a.zarr",
        store_b="b.zarr",
        encoder_a="dinov2-tiny",
        encoder_b="siglip2-tiny",
        layers_a=layers,
        layers_b=layers,
        values=values,
        tokens="mean",
        estimator="linear",
        images=12,
    )


def test_cka_heatmap_scales_its_colours_to_the_values_and_prints_each():
    figure = cka_heatmap(_result([[0.95, 0.97], [0.96, 0.99]], ["2", "3"]))
    axes, bar = figure.axes
    [image] = axes.images
    assert (image.norm.vmin, image.norm.vmax) == (0.95, 0.99)  # not 0..1: 0.95 vs 0.97 shows
    assert image.norm(0.95) == 0 and image.norm(0.99) == 1
    label = _one_line(bar.get_xlabel())
    assert label == "CKA: colours span the values, 0.950–0.990", label
    assert [t.get_text() for t in axes.texts] == ["0.950", "0.970", "0.960", "0.990"]
    # every cell is printed, however many; equal values (a store against itself) draw too
    layers = [str(n) for n in range(12)]
    many = cka_heatmap(_result([[0.5 + i / 100 + j / 1000 for j in range(12)] for i in range(12)],
                               layers))  # fmt: skip
    assert len(many.axes[0].texts) == 144
    flat = cka_heatmap(_result([[1.0, 1.0], [1.0, 1.0]], ["2", "3"]))
    assert [t.get_text() for t in flat.axes[0].texts] == ["1.000"] * 4
    assert flat.axes[1].get_xlabel() == "CKA: all 1.000"


def test_cka_heatmap_names_encoders_as_given():
    """The report names encoders by their sweep keys, as its other plots do."""
    result = _result([[0.9, 0.8], [0.7, 0.6]], ["2", "3"])
    axes = cka_heatmap(result).axes[0]
    assert (axes.get_ylabel(), axes.get_xlabel()) == ("dinov2-tiny layer", "siglip2-tiny layer")
    axes = cka_heatmap(result, names=("dinov2", "siglip2")).axes[0]
    assert (axes.get_ylabel(), axes.get_xlabel()) == ("dinov2 layer", "siglip2 layer")
    assert "dinov2 vs siglip2" in axes.get_title()


# -- the report: CKA over every shared layer, plots as wide as the page -------------------------
def _assert_figures_fill_the_page(out: Path) -> None:
    """index.html's content is at most N px wide, its figures are shown 100% wide, and every
    PNG holds at least N pixels across (never stretched up)."""
    page = (out / "index.html").read_text()
    width = int(re.search(r"body \{[^}]*max-width: (\d+)px", page).group(1))
    assert re.search(r"figure img \{[^}]*width: 100%", page), "figures keep their own width"
    assert re.search(r"figure img \{[^}]*height: auto", page)
    pngs = sorted(out.glob("*.png"))
    assert pngs
    for png in pngs:
        assert Image.open(png).size[0] >= width, (png.name, Image.open(png).size, width)


def test_report_plots_fill_the_content_width(tmp_path):
    out = tmp_path / "report"
    build_report([write_sweep_dir(tmp_path / "sweep")], out, cka=False, predictions=False)
    _assert_figures_fill_the_page(out)


def test_report_cka_heatmap_covers_every_layer_both_stores_hold(stores, tmp_path):
    """The sweep stitches at positions 2 and 3; the stores hold layers 1, 2 and 3: the heatmap
    covers all three, its diagonal at the positions equals the linear CKA table."""
    _, urls = stores
    keys = {"dinov2": urls["dinov2-tiny", "train"], "siglip2": urls["siglip2-tiny", "train"]}
    out = tmp_path / "report"
    build_report([write_sweep_dir(tmp_path / "sweep", stores=keys)], out, predictions=False)
    data = (out / "shapes_cka_heatmap_dinov2_siglip2.csv").read_text().splitlines()
    assert data[0] == "layer_a,layer_b,cka"
    pairs = [tuple(line.split(",")[:2]) for line in data[1:]]
    assert pairs == [(a, b) for a in "123" for b in "123"]
    assert assert_figures_equal_tables(out) == 7
    _assert_figures_fill_the_page(out)


def test_report_with_cka_on_runs_that_name_no_store_says_so(tmp_path):
    """Point 7: result rows without ``config.source`` (stores not recorded) skip CKA with a
    note; the rest of the report is written."""
    sweep = write_sweep_dir(tmp_path / "sweep")
    out = tmp_path / "report"
    result = runner.invoke(
        experiments_app, ["report", str(sweep), "--out", str(out), "--no-predictions"]
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    markdown = (out / "report.md").read_text()
    note = next(line for line in markdown.splitlines() if line.startswith("CKA of "))
    assert note == (
        "CKA of dinov2→siglip2 skipped: the results name no train store of dinov2 or siglip2 "
        "(columns config.source / config.target)."
    )
    assert "Table 1 layout" in markdown


# -- featcache ls ---------------------------------------------------------------------------------
def _ls_rows(output: str) -> list[dict[str, str]]:
    """The rows of ``featcache ls``'s table: header cell -> cell (the first line of each)."""
    [head] = [line for line in output.splitlines() if line.startswith("┃")]
    header = [c.strip() for c in head.split("┃")[1:-1]]
    lines = [line for line in output.splitlines() if line.startswith("│")]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines]
    return [dict(zip(header, row, strict=True)) for row in rows if row[1]]


def test_ls_counts_skipped_images_apart_from_images(tmp_path):
    data = tmp_path / "data"
    folder_with_unreadable_images(data)
    args = ["extract", "--model", "dinov2-tiny", "--data", str(data), "--out", str(tmp_path / "s")]
    result = runner.invoke(featcache_app, [*args, "--layers", "1", "--on-bad-image", "skip"])
    assert result.exit_code == 0, result.output
    listing = runner.invoke(featcache_app, ["ls", str(tmp_path / "s")])
    assert listing.exit_code == 0, listing.output
    [row] = _ls_rows(listing.output)
    assert (row["images"], row["skipped"]) == ("5", "2"), listing.output


def test_ls_of_a_folder_without_stores_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("no stores here")
    result = runner.invoke(featcache_app, ["ls", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output == f"no featcache stores under {tmp_path}\n"


# -- fit on a finished run dir --------------------------------------------------------------------
def test_rerunning_a_finished_fit_says_so(stores, tmp_path):
    _, urls = stores
    out = tmp_path / "run"
    args = [
        "fit",
        "--source",
        urls["dinov2-tiny", "train"],
        "--target",
        urls["siglip2-tiny", "train"],
        "--position",
        "2",
        "--objective",
        "lfm",
        "--lr",
        "5e-3",
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    first = runner.invoke(stitchtrain_app, args)
    assert first.exit_code == 0, first.output
    assert "finished run" not in first.output
    again = runner.invoke(stitchtrain_app, args)
    assert again.exit_code == 0, again.output
    lines = [line for line in again.output.splitlines() if "finished run" in line]
    assert lines == [
        f"{out} holds a finished run: its metrics are shown, nothing was retrained (another "
        "--out trains anew)."
    ], again.output
    rows = [line for line in first.output.splitlines() if line.startswith("│")]
    assert any("test_accuracy" in row for row in rows)
    assert [line for line in again.output.splitlines() if line.startswith("│")] == rows


# -- the missing-weights hint ---------------------------------------------------------------------
def test_missing_weights_hint_shows_the_real_option_syntax():
    from cli._parse import parse_weights
    from featcache import WeightsUnavailableError, load_encoder

    with pytest.raises(WeightsUnavailableError) as caught:
        load_encoder("dinov2-s", pretrained=False)
    message = str(caught.value)
    assert "--weights FILE" not in message
    [option] = re.findall(r"--weights (\S+?)[;)]", message)
    assert parse_weights([option]) == {"dinov2-s": "FILE"}  # what extract / tree accept
    assert "--source-weights" in message and "--target-weights" in message  # fit's options
