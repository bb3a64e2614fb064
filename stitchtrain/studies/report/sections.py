"""The report's sections: per dataset its figures, tables, CKA and prediction blocks; across
datasets; the runs table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from featcache.errors import FeatcacheError
from stitchtrain.studies.report.plots import (
    _plot_accuracy,
    _plot_cka,
    _plot_cka_heatmap,
    _plot_distances,
    _plot_self_stitch,
)
from stitchtrain.studies.report.render import Table
from stitchtrain.studies.report.runs import (
    OBJECTIVE_LABELS,
    _arrow,
    _curve,
    _DatasetRuns,
    _pairs,
    _positions,
    _safe,
    _select,
)
from stitchtrain.studies.report.tables import (
    _distance_table,
    _table1,
    _table2,
    _table3,
    _table4,
    _table6,
    _table12,
)


@dataclass
class _Section:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)  # ("figure"|"table"|"text", x)


def _train_stores(runs: pd.DataFrame, a: str, b: str) -> tuple[str, str]:
    """The train stores (source, target) that the results record for ``runs`` (of a→b), from
    the columns ``config.source`` / ``config.target``; a ``FeatcacheError`` when they name
    none (results written without them)."""
    urls = [
        runs[column].iloc[0] if column in runs else None
        for column in ("config.source", "config.target")
    ]
    if not all(isinstance(url, str) and url for url in urls):
        raise FeatcacheError(
            f"the results name no train store of {a} or {b} (columns config.source / "
            "config.target)."
        )
    return urls[0], urls[1]


def _cka_blocks(stitched, pair, objective, stitch, metric_name, out, prefix, max_images):
    """CKA of the pair's train stores: the heatmap over every layer both stores hold, and at
    each swept position such a layer, against the stitched metric. Encoders are named by
    their sweep keys, as in the other figures."""
    from featcache.store import FeatureStore
    from stitchtrain.studies.cka import cka_stores

    a, b = pair
    runs = _select(stitched, objective=objective, stitch=stitch)
    one = _select(runs, source=a, target=b)
    if one.empty:
        one = _select(runs, source=b, target=a)
        a, b = b, a
    if one.empty or not _positions(one):
        return []
    store_a, store_b = (FeatureStore.open(url) for url in _train_stores(one, a, b))
    layers = [str(n) for n in sorted(set(store_a.layers) & set(store_b.layers))]
    positions = [p for p in _positions(one) if str(p) in layers]
    if not positions:
        raise FeatcacheError(
            f"no swept position ({', '.join(map(str, _positions(one)))}) is a layer both "
            f"stores hold ({a}: {store_a.layers}, {b}: {store_b.layers})."
        )
    result = cka_stores(store_a, store_b, layers, layers, max_images=max_images)
    diagonal = [result.value(p, p) for p in positions]
    accuracies = {}
    for source, target in ((a, b), (b, a)):
        these = _select(runs, source=source, target=target)
        curve = dict(zip(*_curve(these, "metric"), strict=True))
        if all(p in curve for p in positions):
            accuracies[_arrow(source, target)] = [curve[p] for p in positions]
    blocks: list[tuple[str, Any]] = []
    if accuracies:
        path = out / f"{prefix}cka_{_safe(a)}_{_safe(b)}.png"
        blocks.append(_figure_block(_plot_cka(positions, diagonal, accuracies, metric_name, path)))
    heatmap = out / f"{prefix}cka_heatmap_{_safe(a)}_{_safe(b)}.png"
    blocks.append(_figure_block(_plot_cka_heatmap(result, heatmap, (a, b))))
    rows = [
        [str(p), f"{c:.3f}", *[f"{v[i] * 100:.1f}" for v in accuracies.values()]]
        for i, (p, c) in enumerate(zip(positions, diagonal, strict=True))
    ]
    blocks.append(
        (
            "table",
            Table(
                f"Linear CKA ({result.images} train images, mean tokens) vs stitched "
                f"{metric_name} ({OBJECTIVE_LABELS.get(objective)})",
                ["position", f"CKA({a}, {b})", *accuracies],
                rows,
            ),
        )
    )
    return blocks


def _prediction_blocks(stitched, selfs, directions, objective, stitch, dataset):
    """Table 12 for each direction and position; the baselines in a fixed order per pair
    (the paper lists DINOv2->DINOv2 first for both directions)."""
    from stitchtrain.studies.analysis import prediction_analysis

    blocks = []
    for a, b in _pairs(directions):
        for source, target in ((a, b), (b, a)):
            runs = _select(
                stitched, source=source, target=target, objective=objective, stitch=stitch
            )
            for _, run in runs.sort_values(["position", "seed"]).iterrows():
                baselines = []
                for key in (a, b):
                    match = _select(
                        selfs,
                        source=key,
                        objective=objective,
                        stitch=stitch,
                        position=run.position,
                        seed=run.seed,
                    )
                    if not match.empty:
                        baselines.append(Path(match.sweep_dir.iloc[0]) / match.run_dir.iloc[0])
                if len(baselines) < 2:
                    continue
                result = prediction_analysis(Path(run.sweep_dir) / run.run_dir, *baselines)
                labels = {"stitched": (source, target), "baseline_a": (a, a), "baseline_b": (b, b)}
                result.update({k: _arrow(*v) for k, v in labels.items()})
                title = (
                    f"Table 12 layout ({dataset}): {_arrow(source, target)} at position "
                    f"{int(run.position)}, seed {int(run.seed)}"
                )
                blocks.append(("table", _table12(result, title)))
    return blocks


def _figure_block(png: Path) -> tuple[str, dict[str, str]]:
    """A page block showing ``png`` and linking the data it plots (same stem, .csv)."""
    return ("figure", {"png": png.name, "csv": png.with_suffix(".csv").name})


def _figures_section(runs: _DatasetRuns, out: Path) -> _Section:
    """Figures 2-5: per direction distance and accuracy, per pair stitched vs self-stitch."""
    section = _Section(f"{runs.dataset}: figures")
    stitched, stitch = runs.stitched, runs.stitch
    for source, target in runs.directions:
        name = f"{_safe(source)}_to_{_safe(target)}.png"
        path = out / f"{runs.prefix}distance_{name}"
        if _plot_distances(stitched, source, target, stitch, path) is not None:
            section.blocks.append(_figure_block(path))
        path = out / f"{runs.prefix}accuracy_{name}"
        _plot_accuracy(stitched, runs.probes, source, target, stitch, runs.metric_name, path)
        section.blocks.append(_figure_block(path))
    if not runs.selfs.empty and runs.objective is not None:
        for a, b in _pairs(runs.directions):
            path = out / f"{runs.prefix}self_stitch_{_safe(a)}_{_safe(b)}.png"
            _plot_self_stitch(
                stitched, runs.selfs, a, b, runs.objective, stitch, runs.metric_name, path
            )
            section.blocks.append(_figure_block(path))
    return section


def _tables_section(runs: _DatasetRuns) -> _Section:
    """Tables 1, 6, 3 and Figure 2's distances of one dataset."""
    section = _Section(f"{runs.dataset}: tables")
    stitched, directions, dataset = runs.stitched, runs.directions, runs.dataset
    for table in (
        _table1(stitched, directions, runs.stitch, dataset),
        _table6(stitched, runs.probes, directions, runs.stitch, dataset),
        _table3(stitched, directions, runs.objective, dataset) if runs.objective else None,
        _distance_table(stitched, directions, runs.stitch, dataset),
    ):
        if table is not None:
            section.blocks.append(("table", table))
    return section


def _cka_section(runs: _DatasetRuns, out: Path, max_images: int | None) -> _Section | None:
    if not runs.directions:
        return None
    section = _Section(f"{runs.dataset}: representational similarity vs stitchability")
    for pair in _pairs(runs.directions):
        try:
            section.blocks += _cka_blocks(
                runs.stitched,
                pair,
                runs.objective,
                runs.stitch,
                runs.metric_name,
                out,
                runs.prefix,
                max_images,
            )
        except FeatcacheError as err:  # stores moved or lacking a layer: say so, go on
            section.blocks.append(("text", f"CKA of {_arrow(*pair)} skipped: {err}"))
    return section


def _predictions_section(runs: _DatasetRuns) -> _Section | None:
    if runs.task != "cls" or runs.selfs.empty:
        return None
    section = _Section(f"{runs.dataset}: prediction analysis (paper Table 12)")
    section.blocks.append(
        (
            "text",
            "Columns 1-2 preserve, 3 rescue, 4-6 interference; R/W: right or wrong on a "
            "test image; images where all three agree on correctness are left out.",
        )
    )
    try:
        section.blocks += _prediction_blocks(
            runs.stitched, runs.selfs, runs.directions, runs.objective, runs.stitch, runs.dataset
        )
    except FeatcacheError as err:
        section.blocks.append(("text", f"Prediction analysis skipped: {err}"))
    return section if len(section.blocks) > 1 else None


def _across_section(frame: pd.DataFrame, transfers: list[dict]) -> _Section | None:
    """Tables 2 and 4 over every dataset, and the status of every run."""
    if frame.empty:
        table = _table4(frame, transfers)
        return _Section("Task-agnostic stitching", [("table", table)]) if table else None
    ok = frame[frame.status == "ok"]
    section = _Section("Across datasets")
    for table in (_table2(ok), _table4(ok, transfers)):
        if table is not None:
            section.blocks.append(("table", table))
    return section if section.blocks else None


def _runs_section(frame: pd.DataFrame) -> _Section:
    """Every run: its status, the test metric it names (accuracy or mIoU, %), n and the 95%
    interval, the first line of its error; above it the status counts in words."""
    rows = []
    for _, row in frame.iterrows():
        name = "mIoU" if row.task == "seg" else "accuracy"
        value = "–" if pd.isna(row.metric) else f"{row.metric * 100:.1f}"
        n = row.get("metric_n")
        low, high = row.get("metric_low"), row.get("metric_high")
        interval = "–" if low is None or pd.isna(low) else f"{low * 100:.1f}–{high * 100:.1f}"
        error = "" if not isinstance(row.error, str) else row.error.splitlines()[0][:160]
        count = "–" if n is None or pd.isna(n) else str(int(n))
        rows.append([row.dataset, row.id, row.status, name, value, count, interval, error])
    header = ["dataset", "run", "status", "test metric", "value (%)", "n", "95% interval", "error"]
    table = Table("All runs", header, rows, text_columns=(1, 2, 3, 7))
    counts = frame.status.value_counts()
    status = f"{len(frame)} runs: " + ", ".join(f"{n} {state}" for state, n in counts.items())
    return _Section("Runs", [("text", status), ("table", table)])
