"""``stitchtrain report``: the paper's figures and tables from sweep results.

Reads one or more sweep output dirs (``results.parquet``; transfer outputs found below them
are read too) and writes PNG plots, ``report.md`` (Markdown tables, image links) and
``index.html`` (the same, rendered) under the report dir. Per dataset D (file names start
with ``D_``), per direction s->t and per pair {a, b}:

  distance_<s>_to_<t>.png     layer (circles) and final (squares) feature distance against
                              stitch position, LFM vs FFM                      (Figure 2)
  accuracy_<s>_to_<t>.png     test metric against position, one line per objective, each
                              encoder's linear probe as a horizontal line        (Figures 3, 4)
  self_stitch_<a>_<b>.png     stitched (solid) vs self-stitch (dashed) per direction (Figure 5)
  cka_<a>_<b>.png             linear CKA of the two encoders at each position against the
                              stitched metric: similarity does not predict stitchability
  cka_heatmap_<a>_<b>.png     CKA between every pair of swept positions

Tables in the layout of the paper's Tables 1 (TLT by initialisation), 2 (self-stitch vs
stitched across datasets), 3 (stitch families), 4 (task-specific vs task-agnostic FFM, when
transfer outputs exist), 6 (LFM vs FFM under linear probing) and 12 (prediction analysis).
Numbers are percentages of the test metric (accuracy, or mIoU for segmentation), averaged over
seeds (``mean ± std`` when there are several). The "main" objective (Figure 5, Tables 2, 3,
12) is ffm+tlt when swept, else the last swept objective; the main stitch family is mlp when
swept, else the first.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featcache.errors import FeatcacheError
from stitchtrain.sweep import read_results

__all__ = ["Table", "build_report", "load_results", "OBJECTIVE_LABELS"]

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
        head = "".join(f"<th>{_cell(c)}</th>" for c in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in self.rows
        )
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return (
            f"<p class='caption'>{html.escape(self.title)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"
        )


def _cell(value) -> str:
    """Escaped HTML of a cell; Markdown **bold** becomes <b>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(str(value)))


@dataclass
class _Section:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)  # ("image"|"table"|"text", x)


# -- data -----------------------------------------------------------------------------------------
def load_results(dirs: list[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """(all sweep rows with a ``sweep_dir`` column, every transfer output's metrics)."""
    from stitchtrain.analysis import read_transfers

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
def _figure(width: float = 5.2, height: float = 3.6):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    return figure, figure.subplots()


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    return path


def _position_axis(axes, frame_or_positions) -> None:
    """Integer stitch positions on the x axis."""
    positions = (
        frame_or_positions
        if isinstance(frame_or_positions, list)
        else _positions(frame_or_positions)
    )
    if positions:
        axes.set_xticks(positions)
    axes.set_xlabel("stitch position")


def _curve(frame: pd.DataFrame, column: str) -> tuple[list[int], list[float]]:
    """(positions, mean of ``column`` over seeds) sorted by position, NaNs dropped."""
    grouped = frame.groupby("position")[column].mean().dropna().sort_index()
    return [int(p) for p in grouped.index], [float(v) for v in grouped.to_numpy()]


def _plot_distances(stitched: pd.DataFrame, source, target, stitch, path: Path) -> Path | None:
    """Figure 2: layer (o) and final (s) feature distance against position, LFM vs FFM."""
    figure, axes = _figure()
    drawn = False
    for index, objective in enumerate(o for o in ("lfm", "ffm") if o in set(stitched.objective)):
        runs = _select(stitched, objective=objective, stitch=stitch)
        colour = _COLOURS[index]
        for column, marker, kind in (
            ("layer_distance", "o", "layer"),
            ("final_distance", "s", "final"),
        ):
            positions, values = _curve(runs, column)
            if positions:
                label = f"{OBJECTIVE_LABELS[objective]} {kind}"
                axes.plot(positions, values, marker=marker, color=colour, label=label)
                drawn = True
    if not drawn:
        return None
    _position_axis(axes, _select(stitched, stitch=stitch))
    axes.set_ylabel("feature distance (RMS per token)")
    axes.set_title(f"Feature distance, {_arrow(source, target)} ({stitch})")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _plot_accuracy(stitched, probes, source, target, stitch, metric_name, path) -> Path:
    """Figures 3 and 4: metric against position per objective; linear probes as lines."""
    figure, axes = _figure()
    runs = _select(stitched, stitch=stitch)
    for index, objective in enumerate(sorted(set(runs.objective), key=_objective_order)):
        positions, values = _curve(_select(runs, objective=objective), "metric")
        if positions:
            axes.plot(
                positions,
                [v * 100 for v in values],
                marker="o",
                color=_COLOURS[index % len(_COLOURS)],
                label=OBJECTIVE_LABELS.get(objective, objective),
            )
    for index, encoder in enumerate(dict.fromkeys((source, target))):
        accuracy = _mean(_select(probes, source=encoder), "metric")
        if not math.isnan(accuracy):
            style = ("--", ":")[index]
            axes.axhline(accuracy * 100, color="grey", linestyle=style, label=f"{encoder} probe")
    _position_axis(axes, runs)
    axes.set_ylabel(f"test {metric_name} (%)")
    axes.set_title(f"{_arrow(source, target)} ({stitch})")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _plot_self_stitch(stitched, selfs, a, b, objective, stitch, metric_name, path) -> Path:
    """Figure 5: both directions (solid) against both self-stitches (dashed)."""
    figure, axes = _figure()
    curves = [
        (_select(stitched, source=a, target=b), _arrow(a, b), "-", "o", _COLOURS[0]),
        (_select(stitched, source=b, target=a), _arrow(b, a), "-", "o", _COLOURS[1]),
        (_select(selfs, source=a), _arrow(a, a), "--", "s", _COLOURS[2]),
        (_select(selfs, source=b), _arrow(b, b), "--", "s", _COLOURS[4]),
    ]
    shown: list[int] = []
    for runs, label, style, marker, colour in curves:
        runs = _select(runs, objective=objective, stitch=stitch)
        positions, values = _curve(runs, "metric")
        shown += positions
        if positions:
            axes.plot(
                positions,
                [v * 100 for v in values],
                linestyle=style,
                marker=marker,
                color=colour,
                label=label,
            )
    _position_axis(axes, sorted(set(shown)))
    axes.set_ylabel(f"test {metric_name} (%)")
    axes.set_title(f"Stitched vs self-stitch ({OBJECTIVE_LABELS.get(objective, objective)})")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _plot_cka(positions, cka_values, accuracies: dict[str, list[float]], metric_name, path):
    """CKA at each position next to the stitched metric, and one against the other."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 3.6), dpi=110)
    left, right = figure.subplots(1, 2)
    from matplotlib.ticker import MaxNLocator

    left.plot(positions, cka_values, "k-o", label="linear CKA")
    _position_axis(left, list(positions))
    left.set_ylabel("CKA")
    left.set_ylim(0, 1.05)
    twin = left.twinx()
    for index, (label, values) in enumerate(accuracies.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        twin.plot(positions, [v * 100 for v in values], "--s", color=colour, label=label)
        right.scatter(cka_values, [v * 100 for v in values], color=colour, label=label)
    twin.set_ylabel(f"stitched {metric_name} (%)")
    handles = left.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    left.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7)
    left.set_title("CKA and stitched metric per position")
    right.xaxis.set_major_locator(MaxNLocator(4))
    right.set_xlabel("CKA at the stitch position")
    right.set_ylabel(f"stitched {metric_name} (%)")
    right.set_title("similarity vs stitchability")
    right.grid(alpha=0.3)
    for position, x, ys in zip(positions, cka_values, zip(*accuracies.values(), strict=True),
                               strict=True):  # fmt: skip
        right.annotate(str(position), (x, ys[0] * 100), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")  # fmt: skip
    return _save(figure, path)


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


def _cka_section(stitched, pair, objective, stitch, metric_name, out, prefix, max_images):
    """CKA of the pair's train stores at each swept position, against the stitched metric."""
    from stitchtrain.cka import cka_stores, plot_cka

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
    heatmap = plot_cka(result, out / f"{prefix}cka_heatmap_{_safe(a)}_{_safe(b)}.png")
    if accuracies:
        path = out / f"{prefix}cka_{_safe(a)}_{_safe(b)}.png"
        _plot_cka(positions, diagonal, accuracies, metric_name, path)
        blocks.append(("image", path))
    blocks.append(("image", heatmap))
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
    from stitchtrain.analysis import prediction_analysis

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


def _dataset_sections(frame, dataset, out, *, cka, predictions, max_images) -> list[_Section]:
    ok = frame[(frame.dataset == dataset) & (frame.status == "ok")]
    probes = ok[ok.kind == "probe"]
    stitched = ok[ok.kind == "stitch"]
    selfs = ok[ok.kind == "self_stitch"]
    task = ok.task.iloc[0] if len(ok) else "cls"
    metric_name = "mIoU" if task == "seg" else "accuracy"
    both = pd.concat([stitched, selfs])
    objective, stitch = _main_objective(both), _main_stitch(both)
    directions = _directions(stitched)
    prefix = f"{_safe(dataset)}_"
    figures = _Section(f"{dataset}: figures")
    tables = _Section(f"{dataset}: tables")
    for source, target in directions:
        name = f"{_safe(source)}_to_{_safe(target)}.png"
        path = _plot_distances(stitched, source, target, stitch, out / f"{prefix}distance_{name}")
        if path is not None:
            figures.blocks.append(("image", path))
        figures.blocks.append(
            (
                "image",
                _plot_accuracy(
                    stitched,
                    probes,
                    source,
                    target,
                    stitch,
                    metric_name,
                    out / f"{prefix}accuracy_{name}",
                ),
            )
        )
    for a, b in _pairs(directions):
        if not selfs.empty and objective is not None:
            path = out / f"{prefix}self_stitch_{_safe(a)}_{_safe(b)}.png"
            _plot_self_stitch(stitched, selfs, a, b, objective, stitch, metric_name, path)
            figures.blocks.append(("image", path))
    for table in (
        _table1(stitched, directions, stitch, dataset),
        _table6(stitched, probes, directions, stitch, dataset),
        _table3(stitched, directions, objective, dataset) if objective else None,
    ):
        if table is not None:
            tables.blocks.append(("table", table))
    sections = [figures, tables]
    if cka and directions:
        similarity = _Section(f"{dataset}: representational similarity vs stitchability")
        for pair in _pairs(directions):
            try:
                similarity.blocks += _cka_section(
                    stitched, pair, objective, stitch, metric_name, out, prefix, max_images
                )
            except FeatcacheError as err:  # stores moved or lacking a layer: say so, go on
                similarity.blocks.append(("text", f"CKA of {_arrow(*pair)} skipped: {err}"))
        sections.append(similarity)
    if predictions and task == "cls" and not selfs.empty:
        analysis = _Section(f"{dataset}: prediction analysis (paper Table 12)")
        analysis.blocks.append(
            (
                "text",
                "Columns 1-2 preserve, 3 rescue, 4-6 interference; R/W: right or wrong on a "
                "test image; images where all three agree on correctness are left out.",
            )
        )
        try:
            analysis.blocks += _prediction_blocks(
                stitched, selfs, directions, objective, stitch, dataset
            )
        except FeatcacheError as err:
            analysis.blocks.append(("text", f"Prediction analysis skipped: {err}"))
        if len(analysis.blocks) > 1:
            sections.append(analysis)
    return sections


def _runs_table(frame: pd.DataFrame) -> Table:
    rows = []
    for _, row in frame.iterrows():
        metric = "–" if pd.isna(row.metric) else f"{row.metric * 100:.1f}"
        error = "" if not isinstance(row.error, str) else row.error.splitlines()[0][:160]
        rows.append([row.dataset, row.id, row.status, metric, error])
    return Table("All runs", ["dataset", "run", "status", "metric (%)", "error"], rows)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #f3f3f3; }
img { max-width: 100%; margin: 0.5em 0; border: 1px solid #eee; }
.caption { font-weight: 600; margin-bottom: 0.2em; }
.note { font-size: 0.85em; color: #555; }
"""


def _write(sections: list[_Section], out: Path, title: str) -> Path:
    markdown = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        markdown += [f"## {section.title}", ""]
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        for kind, item in section.blocks:
            if kind == "image":
                name = Path(item).name
                markdown += [f"![{name}]({name})", ""]
                body.append(f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>")
            elif kind == "table":
                markdown += [item.markdown(), ""]
                body.append(item.html())
            else:
                markdown += [item, ""]
                body.append(f"<p>{html.escape(item)}</p>")
    (out / "report.md").write_text("\n".join(markdown))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    (out / "index.html").write_text(page)
    return out / "index.html"


def build_report(
    dirs: list[str | Path],
    out: str | Path,
    *,
    cka: bool = True,
    predictions: bool = True,
    cka_max_images: int | None = None,
    title: str = "Model stitching report",
) -> Path:
    """Write the report of the sweeps (and transfers) under ``dirs`` to ``out``; return
    the path of ``index.html``. ``cka`` reads the swept layers of the train stores;
    ``predictions`` recomputes test predictions of stitched and self-stitch runs (cached as
    ``predictions.npy`` in each run dir)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame, transfers = load_results(dirs)
    sections: list[_Section] = []
    if not frame.empty:
        for dataset in dict.fromkeys(frame.dataset):
            sections += _dataset_sections(
                frame, dataset, out, cka=cka, predictions=predictions, max_images=cka_max_images
            )
        ok = frame[frame.status == "ok"]
        across = _Section("Across datasets")
        for table in (_table2(ok), _table4(ok, transfers)):
            if table is not None:
                across.blocks.append(("table", table))
        if across.blocks:
            sections.append(across)
        summary = _Section("Runs")
        counts = frame.status.value_counts().to_dict()
        summary.blocks.append(("text", "Status: " + json.dumps(counts)))
        summary.blocks.append(("table", _runs_table(frame)))
        sections.append(summary)
    elif transfers:
        table = _table4(frame, transfers)
        sections.append(_Section("Task-agnostic stitching", [("table", table)]))
    return _write(sections, out, title)
