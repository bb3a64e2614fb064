"""``stitchtrain report``: the paper's figures and tables from sweep results.

Reads one or more sweep output dirs (``results.parquet``; transfer outputs found below them
are read too) and writes PNG plots, ``report.md`` (Markdown tables, image links) and
``index.html`` (the same, rendered from templates/report.html.j2) under the report dir. Per
dataset D (file names start with ``D_``), per direction s->t (its own runs only) and per
pair {a, b}:

  distance_<s>_to_<t>.png     layer (circles) and final (squares) feature distance against
                              stitch position, LFM vs FFM                      (Figure 2)
  accuracy_<s>_to_<t>.png     test metric against position, one line per objective, each
                              encoder's linear probe as a horizontal line        (Figures 3, 4)
  self_stitch_<a>_<b>.png     stitched (solid) vs self-stitch (dashed) per direction (Figure 5)
  cka_<a>_<b>.png             linear CKA of the two encoders at each position against the
                              stitched metric: similarity does not predict stitchability
  cka_heatmap_<a>_<b>.png     CKA between every pair of swept positions

Every PNG has its data beside it, same name with .csv: the x and y arrays handed to
matplotlib (columns panel, series, x, y; one row per plotted point; the heatmap: layer_a,
layer_b, cka), written by the same call that plots them (``_draw``).

Tables in the layout of the paper's Tables 1 (TLT by initialisation), 2 (self-stitch vs
stitched across datasets), 3 (stitch families), 4 (task-specific vs task-agnostic FFM, when
transfer outputs exist), 6 (LFM vs FFM under linear probing) and 12 (prediction analysis), and
Figure 2's distances. Numbers are percentages of the test metric (accuracy, or mIoU for
segmentation), averaged over seeds (``mean ± std`` when there are several). The "main"
objective (Figure 5, Tables 2, 3, 12) is ffm+tlt when swept, else the last swept objective; the
main stitch family is mlp when swept, else the first.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup, escape

from featcache.errors import FeatcacheError
from stitchtrain.studies.sweep import read_results

__all__ = ["Table", "build_report", "load_results", "OBJECTIVE_LABELS", "ProgressFn"]

OBJECTIVE_LABELS = {
    "lfm": "LFM",
    "ffm": "FFM",
    "tlt": "TLT",
    "lfm+tlt": "LFM+TLT",
    "ffm+tlt": "FFM+TLT",
}
# Table 1: the TLT stage by its initialisation ("Pre-train" row labels of the paper)
_TABLE1_ROWS = (("tlt", "No"), ("lfm+tlt", "LFM"), ("ffm+tlt", "FFM"))
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


@dataclass
class Table:
    """A table rendered both as Markdown and as HTML."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        def line(cells):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

        lines = [f"**{self.title}**", "", line(self.header)]
        lines.append("|" + "|".join(" --- " for _ in self.header) + "|")
        lines += [line(row) for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    def html(self) -> str:
        """The table as the report page shows it (templates/table.html.j2)."""
        return str(_templates().get_template("table.html.j2").module.table(self))


def _cell(value) -> Markup:
    """Escaped HTML of a cell; Markdown **bold** becomes <b>."""
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", str(escape(str(value)))))


@cache
def _templates():
    """The jinja2 environment of the report's templates (package data:
    stitchtrain/studies/templates)."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("stitchtrain.studies", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["cell"] = _cell
    return environment


@dataclass
class _Section:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)  # ("figure"|"table"|"text", x)


# -- data -----------------------------------------------------------------------------------------
def load_results(dirs: list[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """(all sweep rows with a ``sweep_dir`` column, every transfer output's metrics)."""
    from stitchtrain.studies.analysis import read_transfers

    frames, transfers = [], []
    for directory in dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise FeatcacheError(f"No such directory: {directory}.")
        found = read_transfers(directory)
        transfers += found
        try:
            frame = read_results(directory)
        except FeatcacheError:
            if found:
                continue
            raise
        frames.append(frame.assign(sweep_dir=str(directory.resolve())))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return frame, transfers


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _percent(values: pd.Series) -> str:
    values = values.dropna() * 100
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=0):.1f}"


def _mean(frame: pd.DataFrame, column: str) -> float:
    values = frame[column].dropna() if column in frame else pd.Series(dtype=float)
    return float(values.mean()) if len(values) else math.nan


def _select(frame: pd.DataFrame, **where) -> pd.DataFrame:
    mask = np.ones(len(frame), bool)
    for key, value in where.items():
        mask &= (frame[key] == value).to_numpy()
    return frame[mask]


def _arrow(source: str, target: str) -> str:
    return f"{source}→{target}"


# -- plots ----------------------------------------------------------------------------------------
# A figure is built as a list of _Series, the x and y arrays exactly as matplotlib gets them;
# _draw writes those arrays to <stem>.csv beside the PNG and then plots them. No figure is
# drawn any other way, so a figure's CSV is its data.
@dataclass
class _Series:
    """One line (or scatter) on the axes named ``panel``; ``label`` is its legend entry."""

    panel: str
    label: str
    x: list[float]
    y: list[float]
    style: dict[str, Any] = field(default_factory=dict)
    scatter: bool = False


def _figure(width: float = 5.2, height: float = 4.0, panels: int = 1):
    """A constrained-layout figure and its axes (a list when ``panels`` > 1)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return figure, figure.subplots(1, panels)


def _draw(series: list[_Series], panels: dict[str, Any], path: Path) -> None:
    """Write ``series`` to ``path`` with suffix .csv (columns panel, series, x, y; one row per
    plotted point), then plot each on ``panels[series.panel]``."""
    rows = [(s.panel, s.label, x, y) for s in series for x, y in zip(s.x, s.y, strict=True)]
    data = pd.DataFrame(rows, columns=["panel", "series", "x", "y"])
    data.to_csv(path.with_suffix(".csv"), index=False)
    for s in series:
        axes = panels[s.panel]
        if s.scatter:
            axes.scatter(s.x, s.y, label=s.label, **s.style)
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
    figure.savefig(path)
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


def _curve(frame: pd.DataFrame, column: str) -> tuple[list[int], list[float]]:
    """(positions, mean of ``column`` over seeds) sorted by position, NaNs dropped."""
    grouped = frame.groupby("position")[column].mean().dropna().sort_index()
    return [int(p) for p in grouped.index], [float(v) for v in grouped.to_numpy()]


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
            style = {"marker": "o", "color": _COLOURS[index % len(_COLOURS)]}
            label = OBJECTIVE_LABELS.get(objective, objective)
            series.append(_Series("main", label, xs, [v * 100 for v in values], style))
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
        positions, values = _curve(_select(runs, objective=objective, stitch=stitch), "metric")
        if positions:
            style = {"linestyle": linestyle, "marker": marker, "color": colour}
            series.append(_Series("main", label, positions, [v * 100 for v in values], style))
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


def _plot_cka_heatmap(result, path: Path) -> Path:
    """``stitchtrain.studies.cka.plot_cka``'s heatmap of ``result.values``, with those values
    written to ``path`` with suffix .csv (layer_a, layer_b, cka; the layout of
    ``CKAResult.save``)."""
    from stitchtrain.studies.cka import plot_cka

    rows = [
        (layer_a, layer_b, result.values[i][j])
        for i, layer_a in enumerate(result.layers_a)
        for j, layer_b in enumerate(result.layers_b)
    ]
    data = pd.DataFrame(rows, columns=["layer_a", "layer_b", "cka"])
    data.to_csv(path.with_suffix(".csv"), index=False)
    return plot_cka(result, path)


# -- tables ---------------------------------------------------------------------------------------
def _objective_order(objective: str) -> int:
    order = ["lfm", "ffm", "tlt", "lfm+tlt", "ffm+tlt"]
    return order.index(objective) if objective in order else len(order)


def _main_objective(frame: pd.DataFrame) -> str | None:
    objectives = [o for o in frame.objective.dropna().unique()]
    if not objectives:
        return None
    return "ffm+tlt" if "ffm+tlt" in objectives else sorted(objectives, key=_objective_order)[-1]


def _main_stitch(frame: pd.DataFrame) -> str | None:
    stitches = list(frame.stitch.dropna().unique())
    if not stitches:
        return None
    return "mlp" if "mlp" in stitches else stitches[0]


def _positions(frame: pd.DataFrame) -> list[int]:
    return sorted(int(p) for p in frame.position.dropna().unique())


def _table1(stitched, directions, stitch, dataset) -> Table | None:
    present = [(o, label) for o, label in _TABLE1_ROWS if o in set(stitched.objective)]
    if not present:
        return None
    positions = _positions(_select(stitched, stitch=stitch))
    rows = []
    for source, target in directions:
        rows.append([f"**{_arrow(source, target)}**", *[""] * len(positions)])
        for objective, label in present:
            runs = _select(
                stitched, source=source, target=target, objective=objective, stitch=stitch
            )
            rows.append([label, *[_percent(_select(runs, position=p).metric) for p in positions]])
    return Table(
        f"Table 1 layout ({dataset}): TLT by stitch initialisation (Pre-train)",
        ["Pre-train / stitch position", *map(str, positions)],
        rows,
    )


def _table6(stitched, probes, directions, stitch, dataset) -> Table | None:
    present = [o for o in ("lfm", "ffm") if o in set(stitched.objective)]
    if not present:
        return None
    positions = _positions(_select(stitched, stitch=stitch))
    encoders = list(dict.fromkeys(k for pair in directions for k in pair))
    rows = [
        [f"{key} linear probe", *[_percent(_select(probes, source=key).metric)] * len(positions)]
        for key in encoders
        if len(_select(probes, source=key))
    ]
    for source, target in directions:
        for objective in present:
            runs = _select(
                stitched, source=source, target=target, objective=objective, stitch=stitch
            )
            rows.append(
                [
                    f"{_arrow(source, target)} {OBJECTIVE_LABELS[objective]}",
                    *[_percent(_select(runs, position=p).metric) for p in positions],
                ]
            )
    return Table(
        f"Table 6 layout ({dataset}): layer vs final feature matching, linear-probe evaluation",
        ["model / stitch position", *map(str, positions)],
        rows,
    )


def _distance_table(stitched, directions, stitch, dataset) -> Table | None:
    """Figure 2's numbers: mean layer and final feature distance per direction and position."""
    present = [o for o in ("lfm", "ffm") if o in set(stitched.objective)]
    if not present:
        return None
    positions = _positions(_select(stitched, stitch=stitch))
    rows = []
    for source, target in directions:
        for objective in present:
            runs = _select(
                stitched, source=source, target=target, objective=objective, stitch=stitch
            )
            for column, kind in (("layer_distance", "layer"), ("final_distance", "final")):
                means = [_mean(_select(runs, position=p), column) for p in positions]
                rows.append(
                    [
                        f"{_arrow(source, target)} {OBJECTIVE_LABELS[objective]} {kind}",
                        *["–" if math.isnan(m) else f"{m:.3f}" for m in means],
                    ]
                )
    return Table(
        f"Figure 2 data ({dataset}): feature distance (RMS per token), layer and final",
        ["direction / stitch position", *map(str, positions)],
        rows,
    )


def _table3(stitched, directions, objective, dataset) -> Table | None:
    runs = _select(stitched, objective=objective)
    if runs.empty:
        return None
    positions = _positions(runs)
    stitches = list(dict.fromkeys(runs.stitch.dropna()))
    rows = []
    for source, target in directions:
        for stitch in stitches:
            these = _select(runs, source=source, target=target, stitch=stitch)
            rows.append(
                [
                    _arrow(source, target),
                    stitch,
                    *[_percent(_select(these, position=p).metric) for p in positions],
                ]
            )
    return Table(
        f"Table 3 layout ({dataset}): stitch families ({OBJECTIVE_LABELS.get(objective)})",
        ["direction", "stitch", *map(str, positions)],
        rows,
    )


def _table2(frame: pd.DataFrame) -> Table | None:
    """Rows: self-stitches then stitched directions; columns: datasets; cells over positions."""
    ok = frame[frame.kind.isin(["stitch", "self_stitch"])]
    if ok.empty:
        return None
    datasets = list(dict.fromkeys(ok.dataset))
    header, cells = ["model"], {}
    for dataset in datasets:
        runs = ok[ok.dataset == dataset]
        objective, stitch = _main_objective(runs), _main_stitch(runs)
        runs = _select(runs, objective=objective, stitch=stitch)
        positions = _positions(runs)
        task = runs.task.iloc[0] if len(runs) else "cls"
        header.append(f"{dataset} ({'mIoU' if task == 'seg' else 'acc.'}) @ "
                      + " / ".join(map(str, positions)))  # fmt: skip
        for (kind, source, target), group in runs.groupby(["kind", "source", "target"]):
            values = [_percent(_select(group, position=p).metric) for p in positions]
            cells.setdefault((kind != "self_stitch", source, target), {})[dataset] = " / ".join(
                values
            )
    rows = [
        [_arrow(source, target), *[cells[key].get(d, "–") for d in datasets]]
        for key in sorted(cells)
        for _, source, target in [key]
    ]
    return Table("Table 2 layout: self-stitch vs stitched across datasets", header, rows)


def _table4(frame: pd.DataFrame, transfers: list[dict]) -> Table | None:
    """Task-specific FFM (sweep runs) vs task-agnostic FFM (transfer outputs), per dataset."""
    if not transfers:
        return None
    keys = sorted(
        {(t["source_encoder"], t["target_encoder"], int(t["position"])) for t in transfers}
    )
    datasets = list(dict.fromkeys(t["dataset"] for t in transfers))
    header = ["direction", "position"]
    for dataset in datasets:
        header += [f"{dataset} T-Spec.", f"{dataset} T-Agn."]
    rows = []
    specific = frame[frame.objective == "ffm"] if "objective" in frame else None
    for source, target, position in keys:
        row = [_arrow(source, target), str(position)]
        for dataset in datasets:
            spec = (
                _select(
                    specific,
                    source_encoder=source,
                    target_encoder=target,
                    position=position,
                    dataset=dataset,
                )
                if specific is not None
                else pd.DataFrame({"metric": []})
            )
            agnostic = [
                t["test_accuracy"]
                for t in transfers
                if (t["source_encoder"], t["target_encoder"], int(t["position"]), t["dataset"])
                == (source, target, position, dataset)
            ]
            row += [
                _percent(spec.metric) if len(spec) else "–",
                _percent(pd.Series(agnostic, dtype=float)),
            ]
        rows.append(row)
    return Table(
        "Table 4 layout: task-specific (T-Spec.) vs task-agnostic (T-Agn.) FFM, linear probe",
        header,
        rows,
    )


def _table12(result: dict, title: str) -> Table:
    names = [result["baseline_a"], result["baseline_b"], result["stitched"]]
    patterns = [c["pattern"] for c in result["columns"]]
    accuracy = [result["accuracy"][k] for k in ("a", "b", "s")]
    rows = [
        [name, *[p[i] for p in patterns], f"{accuracy[i] * 100:.1f}"]
        for i, name in enumerate(names)
    ]
    rows.append(["Count", *[str(c["count"]) for c in result["columns"]], ""])
    disagreements = result["disagreements"]
    note = (
        f"preserve {result['preserve']}, rescue {result['rescue']}, interference "
        f"{result['interference']} (all right {result['all_right']}, all wrong "
        f"{result['all_wrong']}, {result['images']} images). Where the self-stitches disagree "
        f"({disagreements['images']}): follows {names[0]} {disagreements['follows_a']}, "
        f"follows {names[1]} {disagreements['follows_b']}, neither {disagreements['neither']}."
    )
    return Table(title, ["model", *[f"{i + 1}" for i in range(6)], "Acc."], rows, note)


# -- report ---------------------------------------------------------------------------------------
def _directions(stitched: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(stitched.source, stitched.target, strict=True)))


def _pairs(directions) -> list[tuple[str, str]]:
    pairs = []
    for source, target in directions:
        if (source, target) not in pairs and (target, source) not in pairs:
            pairs.append((source, target))
    return pairs


def _cka_blocks(stitched, pair, objective, stitch, metric_name, out, prefix, max_images):
    """CKA of the pair's train stores at each swept position, against the stitched metric."""
    from stitchtrain.studies.cka import cka_stores

    a, b = pair
    runs = _select(stitched, objective=objective, stitch=stitch)
    one = _select(runs, source=a, target=b)
    if one.empty:
        one = _select(runs, source=b, target=a)
        a, b = b, a
    positions = _positions(one)
    if one.empty or not positions:
        return []
    result = cka_stores(
        one["config.source"].iloc[0],
        one["config.target"].iloc[0],
        [str(p) for p in positions],
        [str(p) for p in positions],
        max_images=max_images,
    )
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
    blocks.append(_figure_block(_plot_cka_heatmap(result, heatmap)))
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


@dataclass
class _DatasetRuns:
    """The finished runs of one dataset, split by kind, and what the report derives from them."""

    dataset: str
    probes: pd.DataFrame
    stitched: pd.DataFrame
    selfs: pd.DataFrame
    task: str
    objective: str | None  # the main objective (module docstring)
    stitch: str | None  # the main stitch family
    directions: list[tuple[str, str]]

    @classmethod
    def of(cls, frame: pd.DataFrame, dataset: str) -> _DatasetRuns:
        ok = frame[(frame.dataset == dataset) & (frame.status == "ok")]
        stitched, selfs = ok[ok.kind == "stitch"], ok[ok.kind == "self_stitch"]
        both = pd.concat([stitched, selfs])
        return cls(
            dataset,
            ok[ok.kind == "probe"],
            stitched,
            selfs,
            ok.task.iloc[0] if len(ok) else "cls",
            _main_objective(both),
            _main_stitch(both),
            _directions(stitched),
        )

    @property
    def metric_name(self) -> str:
        return "mIoU" if self.task == "seg" else "accuracy"

    @property
    def prefix(self) -> str:
        return f"{_safe(self.dataset)}_"


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
    rows = []
    for _, row in frame.iterrows():
        metric = "–" if pd.isna(row.metric) else f"{row.metric * 100:.1f}"
        error = "" if not isinstance(row.error, str) else row.error.splitlines()[0][:160]
        rows.append([row.dataset, row.id, row.status, metric, error])
    table = Table("All runs", ["dataset", "run", "status", "metric (%)", "error"], rows)
    status = "Status: " + json.dumps(frame.status.value_counts().to_dict())
    return _Section("Runs", [("text", status), ("table", table)])


def _write(sections: list[_Section], out: Path, title: str) -> Path:
    """report.md (Markdown) and index.html (templates/report.html.j2) of ``sections``."""
    markdown = [f"# {title}", ""]
    for section in sections:
        markdown += [f"## {section.title}", ""]
        for kind, item in section.blocks:
            if kind == "figure":
                markdown += [f"![{item['png']}]({item['png']})", ""]
                markdown += [f"Plotted data: [{item['csv']}]({item['csv']})", ""]
            elif kind == "table":
                markdown += [item.markdown(), ""]
            else:
                markdown += [item, ""]
    (out / "report.md").write_text("\n".join(markdown))
    page = _templates().get_template("report.html.j2").render(title=title, sections=sections)
    (out / "index.html").write_text(page)
    return out / "index.html"


ProgressFn = Callable[[str, int, int], None]


def build_report(
    dirs: list[str | Path],
    out: str | Path,
    *,
    cka: bool = True,
    predictions: bool = True,
    cka_max_images: int | None = None,
    title: str = "Model stitching report",
    progress: ProgressFn | None = None,
) -> Path:
    """Write the report of the sweeps (and transfers) under ``dirs`` to ``out``; return
    the path of ``index.html``. ``cka`` reads the swept layers of the train stores;
    ``predictions`` recomputes test predictions of stitched and self-stitch runs (cached as
    ``predictions.npy`` in each run dir).

    ``progress(step, done, total)`` is called as each step starts, ``done`` of ``total``
    steps finished, and once at the end as ``("done", total, total)``. The steps, per
    dataset D: "figures D", "tables D", "CKA D" (with ``cka``), "predictions D" (with
    ``predictions``); then "tables across datasets", "runs table" (when there are sweep
    results) and "pages" (writing report.md and index.html)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame, transfers = load_results(dirs)
    steps: list[tuple[str, Callable[[], _Section | None]]] = []
    datasets = list(dict.fromkeys(frame.dataset)) if not frame.empty else []
    for dataset in datasets:
        runs = _DatasetRuns.of(frame, dataset)
        steps.append((f"figures {dataset}", lambda runs=runs: _figures_section(runs, out)))
        steps.append((f"tables {dataset}", lambda runs=runs: _tables_section(runs)))
        if cka:
            steps.append(
                (f"CKA {dataset}", lambda runs=runs: _cka_section(runs, out, cka_max_images))
            )
        if predictions:
            steps.append((f"predictions {dataset}", lambda runs=runs: _predictions_section(runs)))
    steps.append(("tables across datasets", lambda: _across_section(frame, transfers)))
    if not frame.empty:
        steps.append(("runs table", lambda: _runs_section(frame)))
    total = len(steps) + 1
    sections: list[_Section] = []
    for done, (step, make) in enumerate(steps):
        if progress is not None:
            progress(step, done, total)
        section = make()
        if section is not None:
            sections.append(section)
    if progress is not None:
        progress("pages", total - 1, total)
    index = _write(sections, out, title)
    if progress is not None:
        progress("done", total, total)
    return index
