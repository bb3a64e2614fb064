"""The report's figures (paper Figures 2-5 and the CKA figures), each drawn from its data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from stitchtrain.studies.report.runs import (
    OBJECTIVE_LABELS,
    _arrow,
    _curve,
    _mean,
    _objective_order,
    _positions,
    _select,
)

PAGE_WIDTH_PX = 1100  # the report page's content width (index.html's body max-width)
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]  # one per objective: a line on top hides none


# -- plots ----------------------------------------------------------------------------------------
# A figure is built as a list of _Series, the x and y arrays exactly as matplotlib gets them;
# _draw writes those arrays to <stem>.csv beside the PNG and then plots them. No figure is
# drawn any other way, so a figure's CSV is its data.
@dataclass
class _Series:
    """One line (or scatter) on the axes named ``panel``; ``label`` is its legend entry;
    ``low`` / ``high``: error bar ends at each point (NaN: none)."""

    panel: str
    label: str
    x: list[float]
    y: list[float]
    style: dict[str, Any] = field(default_factory=dict)
    scatter: bool = False
    low: list[float] | None = None
    high: list[float] | None = None


def _figure(width: float = 7.0, height: float = 4.4, panels: int = 1):
    """A constrained-layout figure and its axes (a list when ``panels`` > 1)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return figure, figure.subplots(1, panels)


def _draw(series: list[_Series], panels: dict[str, Any], path: Path) -> None:
    """Write ``series`` to ``path`` with suffix .csv (columns panel, series, x, y, y_low,
    y_high; one row per plotted point; y_low / y_high the error bar, empty when none), then
    plot each on ``panels[series.panel]``."""
    rows = [
        (s.panel, s.label, x, y, low, high)
        for s in series
        for x, y, low, high in zip(
            s.x, s.y, s.low or [math.nan] * len(s.x), s.high or [math.nan] * len(s.x), strict=True
        )
    ]
    data = pd.DataFrame(rows, columns=["panel", "series", "x", "y", "y_low", "y_high"])
    data.to_csv(path.with_suffix(".csv"), index=False)
    for s in series:
        axes = panels[s.panel]
        if s.scatter:
            axes.scatter(s.x, s.y, label=s.label, **s.style)
        elif s.low is not None and s.high is not None:
            ends = zip(s.y, s.low, s.high, strict=True)
            bars = [(0, 0) if math.isnan(lo) else (y - lo, hi - y) for y, lo, hi in ends]
            below, above = [b for b, _ in bars], [a for _, a in bars]
            axes.errorbar(s.x, s.y, yerr=[below, above], capsize=3, label=s.label, **s.style)
        else:
            axes.plot(s.x, s.y, label=s.label, **s.style)


def _legend_below(figure, *axes, per_row: int = 4) -> None:
    """One legend for all ``axes``, below them (outside the plotting area: it hides no data),
    in rows of at most ``per_row`` entries, filled evenly."""
    handles, labels = [], []
    for each in axes:
        more = each.get_legend_handles_labels()
        handles += more[0]
        labels += more[1]
    if handles:
        rows = math.ceil(len(handles) / per_row)
        figure.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=math.ceil(len(handles) / rows),
            fontsize=8,
        )


def _save(figure, path: Path) -> Path:
    """``figure`` as a PNG ``PAGE_WIDTH_PX`` pixels wide (the dpi follows its width in
    inches), so the page shows it across its content width at its own size."""
    figure.savefig(path, dpi=PAGE_WIDTH_PX / figure.get_figwidth())
    return path


def _position_axis(axes, positions: list[int]) -> None:
    """Integer stitch positions on the x axis."""
    if positions:
        axes.set_xticks(positions)
    axes.set_xlabel("stitch position")


def _padded(values: list[float], *, pad: float, low: float, high: float) -> tuple[float, float]:
    """Axis limits around ``values``: ``pad`` or 15% of their span beyond each end, whichever
    is larger, never beyond (``low``, ``high``) - which lie outside the values' possible range,
    so no marker is ever cut at an edge."""
    smallest, largest = min(values), max(values)
    margin = max(pad, 0.15 * (largest - smallest))
    return max(smallest - margin, low), min(largest + margin, high)


def _bars(runs: pd.DataFrame, positions: list[int]) -> tuple[list[float], list[float]]:
    """Error bar ends (%) at each of ``positions``: the run's 95% interval (metric_low,
    metric_high) when one run is there, mean ± std over seeds when several (as the tables'
    cells), NaN when no interval is known."""
    low, high = [], []
    for position in positions:
        here = runs[runs.position == position].dropna(subset=["metric"])
        if len(here) == 1 and "metric_low" in here and pd.notna(here.metric_low.iloc[0]):
            low.append(float(here.metric_low.iloc[0]) * 100)
            high.append(float(here.metric_high.iloc[0]) * 100)
        elif len(here) > 1:
            mean, spread = here.metric.mean() * 100, here.metric.std(ddof=0) * 100
            low.append(mean - spread)
            high.append(mean + spread)
        else:
            low.append(math.nan)
            high.append(math.nan)
    return low, high


def _distance_series(stitched: pd.DataFrame, source, target, stitch) -> list[_Series]:
    """Figure 2 of one direction: layer (o) and final (s) distance per position, LFM and FFM."""
    series = []
    runs = _select(stitched, source=source, target=target, stitch=stitch)
    for index, objective in enumerate(o for o in ("lfm", "ffm") if o in set(runs.objective)):
        for column, marker, kind in (
            ("layer_distance", "o", "layer"),
            ("final_distance", "s", "final"),
        ):
            positions, values = _curve(_select(runs, objective=objective), column)
            if positions:
                label = f"{OBJECTIVE_LABELS[objective]} {kind}"
                style = {"marker": marker, "color": _COLOURS[index]}
                series.append(_Series("main", label, positions, values, style))
    return series


def _plot_distances(stitched: pd.DataFrame, source, target, stitch, path: Path) -> Path | None:
    """Figure 2: layer (o) and final (s) feature distance against position, LFM vs FFM."""
    series = _distance_series(stitched, source, target, stitch)
    if not series:
        return None
    figure, axes = _figure()
    _draw(series, {"main": axes}, path)
    _position_axis(axes, _positions(_select(stitched, source=source, target=target)))
    axes.set_ylabel("feature distance (RMS per token)")
    axes.set_title(f"Feature distance, {_arrow(source, target)} ({stitch})")
    axes.grid(alpha=0.3)
    _legend_below(figure, axes)
    return _save(figure, path)


def _plot_accuracy(stitched, probes, source, target, stitch, metric_name, path) -> Path:
    """Figures 3 and 4: metric (%) against position per objective, one direction; each
    encoder's linear probe as a horizontal line over the same positions."""
    runs = _select(stitched, source=source, target=target, stitch=stitch)
    positions = _positions(runs)
    series = []
    for index, objective in enumerate(sorted(set(runs.objective), key=_objective_order)):
        xs, values = _curve(_select(runs, objective=objective), "metric")
        if xs:
            style = {
                "marker": _MARKERS[index % len(_MARKERS)],
                "color": _COLOURS[index % len(_COLOURS)],
                "markerfacecolor": "none" if index % 2 else _COLOURS[index % len(_COLOURS)],
            }
            label = OBJECTIVE_LABELS.get(objective, objective)
            low, high = _bars(_select(runs, objective=objective), xs)
            series.append(_Series("main", label, xs, [v * 100 for v in values], style,
                                  low=low, high=high))  # fmt: skip
    for index, encoder in enumerate(dict.fromkeys((source, target))):
        accuracy = _mean(_select(probes, source=encoder), "metric")
        if not math.isnan(accuracy) and positions:
            style = {"color": "grey", "linestyle": ("--", ":")[index]}
            y = [accuracy * 100] * len(positions)
            series.append(_Series("main", f"{encoder} probe", positions, y, style))
    figure, axes = _figure()
    _draw(series, {"main": axes}, path)
    _position_axis(axes, positions)
    axes.set_ylabel(f"test {metric_name} (%)")
    axes.set_title(f"{_arrow(source, target)} ({stitch})")
    axes.grid(alpha=0.3)
    _legend_below(figure, axes)
    return _save(figure, path)


def _plot_self_stitch(stitched, selfs, a, b, objective, stitch, metric_name, path) -> Path:
    """Figure 5: both directions (solid) against both self-stitches (dashed)."""
    curves = [
        (_select(stitched, source=a, target=b), _arrow(a, b), "-", "o", _COLOURS[0]),
        (_select(stitched, source=b, target=a), _arrow(b, a), "-", "o", _COLOURS[1]),
        (_select(selfs, source=a), _arrow(a, a), "--", "s", _COLOURS[2]),
        (_select(selfs, source=b), _arrow(b, b), "--", "s", _COLOURS[4]),
    ]
    series = []
    for runs, label, linestyle, marker, colour in curves:
        these = _select(runs, objective=objective, stitch=stitch)
        positions, values = _curve(these, "metric")
        if positions:
            style = {"linestyle": linestyle, "marker": marker, "color": colour}
            low, high = _bars(these, positions)
            percent = [v * 100 for v in values]
            series.append(_Series("main", label, positions, percent, style, low=low, high=high))
    figure, axes = _figure()
    _draw(series, {"main": axes}, path)
    _position_axis(axes, sorted({x for s in series for x in s.x}))
    axes.set_ylabel(f"test {metric_name} (%)")
    axes.set_title(f"Stitched vs self-stitch ({OBJECTIVE_LABELS.get(objective, objective)})")
    axes.grid(alpha=0.3)
    _legend_below(figure, axes)
    return _save(figure, path)


def _plot_cka(positions, cka_values, accuracies: dict[str, list[float]], metric_name, path):
    """The CKA figure (``_cka_figure``) as a PNG, its data beside it."""
    return _save(_cka_figure(positions, cka_values, accuracies, metric_name, path), path)


def _cka_figure(positions, cka_values, accuracies: dict[str, list[float]], metric_name, path):
    """Left: linear CKA per position (left axis) and each direction's stitched metric (%,
    right axis); right: the metric against CKA, one point per position (labelled). Both
    metric axes share one range padded around the data; one legend below both panels.
    ``accuracies``: direction -> metric (fraction) at each of ``positions``. Writes the data
    to ``path`` with suffix .csv; returns the figure."""
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = _figure(9.0, 4.2, panels=2)
    figure.get_layout_engine().set(wspace=0.08)  # room between the twin axis and the right panel
    twin = left.twinx()
    cka_style = {"color": "k", "marker": "o"}
    series = [_Series("left", "linear CKA", list(positions), list(cka_values), cka_style)]
    for index, (arrow, values) in enumerate(accuracies.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        percent = [v * 100 for v in values]
        line = {"color": colour, "linestyle": "--", "marker": "s"}
        series.append(_Series("twin", f"{arrow} {metric_name}", list(positions), percent, line))
        dots = {"color": colour, "marker": "D"}
        series.append(_Series("right", f"{arrow} vs CKA", list(cka_values), percent, dots, True))
    _draw(series, {"left": left, "twin": twin, "right": right}, path)
    percents = [y for s in series if s.panel != "left" for y in s.y]
    limits = _padded(percents, pad=5.0, low=-5.0, high=105.0)
    _position_axis(left, list(positions))
    left.set_ylabel("CKA")
    left.set_ylim(0, 1.05)
    twin.set_ylim(*limits)
    twin.set_ylabel(f"stitched {metric_name} (%)")
    left.set_title("CKA and stitched metric per position")
    right.set_ylim(*limits)
    right.set_xlim(*_padded(list(cka_values), pad=0.03, low=-0.03, high=1.03))
    right.xaxis.set_major_locator(MaxNLocator(4))
    right.set_xlabel("CKA at the stitch position")
    right.set_ylabel(f"stitched {metric_name} (%)")
    right.set_title("similarity vs stitchability")
    right.grid(alpha=0.3)
    for s in series:
        if s.panel == "right":
            for position, x, y in zip(positions, s.x, s.y, strict=True):
                right.annotate(
                    str(position), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    _legend_below(figure, left, twin, right, per_row=5)
    return figure


def _plot_cka_heatmap(result, path: Path, names: tuple[str, str]) -> Path:
    """``stitchtrain.studies.cka.cka_heatmap`` of ``result.values`` (encoders called
    ``names``), with those values written to ``path`` with suffix .csv (layer_a, layer_b, cka;
    the layout of ``CKAResult.save``)."""
    from stitchtrain.studies.cka import cka_heatmap

    rows = [
        (layer_a, layer_b, result.values[i][j])
        for i, layer_a in enumerate(result.layers_a)
        for j, layer_b in enumerate(result.layers_b)
    ]
    data = pd.DataFrame(rows, columns=["layer_a", "layer_b", "cka"])
    data.to_csv(path.with_suffix(".csv"), index=False)
    return _save(cka_heatmap(result, names), path)
