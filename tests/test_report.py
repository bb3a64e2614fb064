"""stitchtrain report: the paper's figures as PNGs and its tables, from a real (tiny) sweep."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import extract_demo_stores
from PIL import Image
from typer.testing import CliRunner

from cli.experiments_app import experiments_app
from stitchtrain.pipeline.fit import fit
from stitchtrain.studies.analysis import transfer_run
from stitchtrain.studies.report.page import build_report
from stitchtrain.studies.report.render import Table
from stitchtrain.studies.sweep.config import load_sweep_config
from stitchtrain.studies.sweep.grid import plan_sweep
from stitchtrain.studies.sweep.run import run_sweep
from stitchtrain.train.config import FitConfig

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
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
    assert assert_figures_equal_tables(out) == len(pngs)
    assert page.count("<table>") >= 8
    markdown = (out / "report.md").read_text()
    for title in ("Table 1 layout", "Table 2 layout", "Table 3 layout", "Table 4 layout"):
        assert title in markdown and title in page
    assert "Table 6 layout" in markdown and "Linear CKA" in markdown
    assert markdown.count("Table 12 layout") == 4  # 2 directions x 2 positions

    # Table 1: the FFM row of the first direction holds the sweep's FFM+TLT accuracies, each
    # with its 95% interval (one seed)
    table = results["table"]
    runs = [table[table.id == f"dinov2--siglip2--ffm-tlt--mlp--n{p}--s0"].iloc[0] for p in (2, 3)]
    expected = [
        f"{r.metric * 100:.1f} [{r.metric_low * 100:.1f}–{r.metric_high * 100:.1f}]" for r in runs
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


# -- figures equal the tables ---------------------------------------------------------------------
# per direction, objective: test accuracy (%) at positions 2 and 3, the mean of seeds 0 and 1
# (seed 0 is 2.5 below, seed 1 2.5 above). LFM is the example: averaged over both
# directions a figure would show 62.5 -> 68.75 for each.
DIRECTIONS = {
    ("dinov2", "siglip2"): {"lfm": [62.5, 72.5], "ffm": [55.0, 70.0], "ffm+tlt": [80.0, 85.0]},
    ("siglip2", "dinov2"): {"lfm": [62.5, 65.0], "ffm": [45.0, 50.0], "ffm+tlt": [75.0, 77.5]},
}
SELF_STITCH = {"dinov2": [90.0, 87.5], "siglip2": [82.5, 80.0]}
PROBES = {"dinov2": 92.5, "siglip2": 85.0}


def write_sweep_dir(directory: Path, stores: dict[str, str] | None = None) -> Path:
    """A sweep output dir (results.parquet in the layout ``run_sweep`` writes) with the runs
    above on dataset "shapes"; layer distance 1 + accuracy/100, final distance twice that.
    ``stores`` (encoder key -> train store with layers 2 and 3) lets the report compute CKA."""
    rows = []

    def row(kind, source, target, objective, position, seed, percent):
        metric = percent / 100
        return {
            "id": f"{kind}--{source}--{target}--{objective}--n{position}--s{seed}",
            "kind": kind,
            "source": source,
            "target": target,
            "source_encoder": f"{source}-tiny",
            "target_encoder": f"{target}-tiny",
            "position": position,
            "objective": objective,
            "stitch": None if kind == "probe" else "mlp",
            "seed": seed,
            "dataset": "shapes",
            "task": "cls",
            "status": "ok",
            "error": None,
            "run_dir": "runs/none",
            "metric": metric,
            "test_accuracy": metric,
            "layer_distance": None if kind == "probe" else 1 + metric,
            "final_distance": None if kind == "probe" else 2 * (1 + metric),
            "config.source": (stores or {}).get(source),
            "config.target": (stores or {}).get(target),
        }

    for seed, offset in ((0, -2.5), (1, 2.5)):
        rows += [row("probe", k, k, None, None, seed, v + offset) for k, v in PROBES.items()]
        for (source, target), curves in DIRECTIONS.items():
            for objective, values in curves.items():
                for position, value in zip((2, 3), values, strict=True):
                    value += offset
                    rows.append(row("stitch", source, target, objective, position, seed, value))
        for key, values in SELF_STITCH.items():
            for position, value in zip((2, 3), values, strict=True):
                rows.append(row("self_stitch", key, key, "ffm+tlt", position, seed, value + offset))
    directory.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(directory / "results.parquet")
    return directory


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    build_report([write_sweep_dir(root / "sweep")], root / "report", cka=False, predictions=False)
    return root / "report"


def test_each_direction_figure_plots_its_own_runs(synthetic_report):
    for (source, target), curves in DIRECTIONS.items():
        name = f"shapes_accuracy_{source}_to_{target}.csv"
        data = pd.read_csv(synthetic_report / name)
        for objective, label in (("lfm", "LFM"), ("ffm", "FFM"), ("ffm+tlt", "FFM+TLT")):
            series = data[data.series == label]
            assert series.x.tolist() == [2, 3], name
            assert series.y.round(3).tolist() == curves[objective], (name, label)
        probes = {f"{key} probe": [value] * 2 for key, value in PROBES.items()}
        for label, values in probes.items():
            assert data[data.series == label].y.round(3).tolist() == values, (name, label)
        distances = pd.read_csv(synthetic_report / f"shapes_distance_{source}_to_{target}.csv")
        layer = distances[distances.series == "LFM layer"].y.round(6).tolist()
        assert layer == [round(1 + v / 100, 6) for v in curves["lfm"]]


def _markdown_tables(markdown: str) -> dict[str, list[list[str]]]:
    """Every table of a report.md: title -> rows of cells, the header row first."""
    tables = {}
    for title, lines in re.findall(r"\*\*(.+?)\*\*\n\n((?:\|.*\|\n?)+)", markdown):
        rows = [
            [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines.split("\n")
        ]
        tables[title] = [row for row in rows if row and set(row) != {"---"}]
    return tables


def _table(tables: dict, starts: str) -> list[list[str]]:
    found = [rows for title, rows in tables.items() if title.startswith(starts)]
    assert len(found) == 1, (starts, list(tables))
    return found[0]


def _row(rows: list[list[str]], label: str) -> dict[float, str]:
    """{position: cell} of the row labelled ``label`` (positions from the header row)."""
    match = [r for r in rows[1:] if r[0] == label]
    assert len(match) == 1, (label, rows)
    return dict(zip(map(float, rows[0][1:]), match[0][1:], strict=True))


def _series(data: pd.DataFrame, label: str, panel: str = "main") -> dict[float, float]:
    """{x: y} of one plotted series of a figure's CSV."""
    rows = data[(data.series == label) & (data.panel == panel)]
    assert len(rows), (label, panel)
    return dict(zip(rows.x.astype(float), rows.y, strict=True))


def _near(plotted: dict, shown: dict, decimals: int, what) -> None:
    """The plotted {x: y} round to the table's {x: cell} (its first number; "–" cells: none)."""
    shown = {x: float(c.split()[0]) for x, c in shown.items() if c != "–"}
    assert sorted(plotted) == sorted(shown), (what, plotted, shown)
    for x, y in plotted.items():
        assert abs(y - shown[x]) <= 0.5 * 10**-decimals + 1e-9, (what, x, y, shown[x])


def _direction_block(table1: list[list[str]], arrow: str) -> list[list[str]]:
    """Table 1's rows under the bold row of one direction, with the header row."""
    labels = [r[0] for r in table1]
    start = labels.index(f"**{arrow}**") + 1
    end = next((i for i in range(start, len(labels)) if labels[i].startswith("**")), None)
    return [table1[0], *table1[start:end]]


def _check_accuracy(data, tables, dataset, arrow) -> None:
    """Figures 3/4 against Table 6 (LFM, FFM, probes) and Table 1 (the TLT objectives)."""
    table6 = _table(tables, f"Table 6 layout ({dataset})")
    block = _direction_block(_table(tables, f"Table 1 layout ({dataset})"), arrow)
    for label in dict.fromkeys(data.series):
        if label.endswith(" probe"):
            shown = _row(table6, label.replace(" probe", " linear probe"))
        elif label in ("LFM", "FFM"):
            shown = _row(table6, f"{arrow} {label}")
        else:
            shown = _row(block, {"TLT": "No", "LFM+TLT": "LFM", "FFM+TLT": "FFM"}[label])
        _near(_series(data, label), shown, 1, (arrow, label))


def _check_distance(data, tables, dataset, arrow) -> None:
    distances = _table(tables, f"Figure 2 data ({dataset})")
    for label in dict.fromkeys(data.series):
        _near(_series(data, label), _row(distances, f"{arrow} {label}"), 3, (arrow, label))


def _check_self_stitch(data, tables, dataset) -> None:
    """Figure 5 against Table 2's cells ("v / v" over the positions its header names)."""
    table2 = _table(tables, "Table 2 layout")
    column = next(i for i, h in enumerate(table2[0]) if h.startswith(f"{dataset} ("))
    positions = [float(p) for p in table2[0][column].split(" @ ")[1].split(" / ")]
    for label in dict.fromkeys(data.series):
        cells = next(r for r in table2 if r[0] == label)[column].split(" / ")
        _near(_series(data, label), dict(zip(positions, cells, strict=True)), 1, label)


def _check_cka(data, tables, kind, a, b) -> None:
    """The CKA figure (CKA and metric per position; metric against CKA) and the heatmap's
    diagonal against the linear CKA table of the pair."""
    found = [
        r for t, r in tables.items() if t.startswith("Linear CKA") and r[0][1] == f"CKA({a}, {b})"
    ]
    assert len(found) == 1, (a, b)
    header, *rows = found[0]
    columns = {h: {float(r[0]): r[i] for r in rows} for i, h in enumerate(header)}
    similarity = columns[header[1]]
    if kind == "cka_heatmap":  # every layer both stores hold; at the positions, the table
        diagonal = data[
            (data.layer_a == data.layer_b) & data.layer_a.astype(float).isin(similarity)
        ]
        _near(
            dict(zip(diagonal.layer_a.astype(float), diagonal.cka, strict=True)),
            similarity,
            3,
            kind,
        )
        return
    _near(_series(data, "linear CKA", "left"), similarity, 3, kind)
    assert len(header) > 2, header  # at least one direction's metric
    for direction in header[2:]:
        _near(_series(data, f"{direction} accuracy", "twin"), columns[direction], 1, direction)
        dots = data[(data.panel == "right") & (data.series == f"{direction} vs CKA")]
        shown = sorted(zip(similarity.values(), columns[direction].values(), strict=True))
        plotted = sorted(zip(dots.x, dots.y, strict=True))
        assert len(plotted) == len(shown), direction
        for (x, y), (cka, metric) in zip(plotted, shown, strict=True):
            assert abs(x - float(cka)) <= 5e-4 and abs(y - float(metric)) <= 0.05 + 1e-9


_FIGURE_NAME = re.compile(
    r"([^_]+)_(accuracy|distance|self_stitch|cka_heatmap|cka)_([^_]+)_(?:to_)?([^_]+)"
)


def assert_figures_equal_tables(out: Path) -> int:
    """Every PNG of the report has its plotted data beside it (same stem, .csv), linked from
    index.html next to the image, and that data equals the report's table rows: accuracy
    figures Tables 6 and 1, distance figures the Figure 2 table, self-stitch figures Table 2,
    CKA figures and heatmaps the linear CKA table. Returns the number of figures checked."""
    tables = _markdown_tables((out / "report.md").read_text())
    page = (out / "index.html").read_text()
    pngs = sorted(out.glob("*.png"))
    for png in pngs:
        csv = png.with_suffix(".csv")
        assert csv.is_file(), f"{png.name} has no data file {csv.name}"
        figure = page[page.index(f'<img src="{png.name}"') :].split("</figure>")[0]
        assert f'href="{csv.name}"' in figure, f"index.html does not link {csv.name}"
        data = pd.read_csv(csv)
        dataset, kind, a, b = _FIGURE_NAME.fullmatch(png.stem).groups()
        if kind == "accuracy":
            _check_accuracy(data, tables, dataset, f"{a}→{b}")
        elif kind == "distance":
            _check_distance(data, tables, dataset, f"{a}→{b}")
        elif kind == "self_stitch":
            _check_self_stitch(data, tables, dataset)
        else:
            _check_cka(data, tables, kind, a, b)
    return len(pngs)


def test_every_figure_writes_the_data_it_plots_and_it_equals_the_tables(synthetic_report):
    assert sorted(p.stem for p in synthetic_report.glob("*.png")) == [
        "shapes_accuracy_dinov2_to_siglip2",
        "shapes_accuracy_siglip2_to_dinov2",
        "shapes_distance_dinov2_to_siglip2",
        "shapes_distance_siglip2_to_dinov2",
        "shapes_self_stitch_dinov2_siglip2",
    ]
    assert assert_figures_equal_tables(synthetic_report) == 5


def test_cka_figure_shows_every_point_and_legend_hides_none(tmp_path):
    from stitchtrain.studies.report.plots import _cka_figure

    accuracies = {"a→b": [1.0, 0.55, 0.0], "b→a": [0.98, 0.6, 0.02]}  # the metric's extremes
    cka = [0.2, 0.6, 1.0]
    figure = _cka_figure([2, 6, 10], cka, accuracies, "accuracy", tmp_path / "cka.png")
    figure.canvas.draw()
    left, right, twin = figure.axes  # twin: left's metric axis, added last
    for axes in (twin, right):
        low, high = axes.get_ylim()
        assert low < 0 and high > 100  # 0 % and 100 % markers drawn whole
        assert low >= -10 and high <= 110  # and the axis is about the metric's range
    low, high = right.get_xlim()
    assert low < 0.2 and 1.0 < high <= 1.05
    [legend] = figure.legends  # one legend, for the figure
    entries = [t.get_text() for t in legend.get_texts()]
    assert entries == ["linear CKA", "a→b accuracy", "b→a accuracy", "a→b vs CKA", "b→a vs CKA"]
    box = legend.get_window_extent()
    for axes in figure.axes:
        assert not box.overlaps(axes.get_window_extent()), "the legend covers an axes"


def test_build_report_reports_progress_step_by_step(synthetic_report, tmp_path):
    calls = []
    sweep = synthetic_report.parent / "sweep"

    def progress(step: str, done: int, total: int) -> None:
        calls.append((step, done, total))

    build_report([sweep], tmp_path / "report", cka=False, predictions=False, progress=progress)
    assert [step for step, _, _ in calls] == [
        "figures shapes",
        "tables shapes",
        "tables across datasets",
        "models",
        "runs table",
        "pages",
        "done",
    ]
    assert [(done, total) for _, done, total in calls] == [(k, 6) for k in range(7)]
