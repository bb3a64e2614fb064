"""The report's tables in the layout of the paper's Tables 1, 2, 3, 4, 6 and 12, and Figure 2's
distances."""

from __future__ import annotations

import math

import pandas as pd

from stitchtrain.studies.report.render import Table
from stitchtrain.studies.report.runs import (
    OBJECTIVE_LABELS,
    _arrow,
    _cell,
    _main_objective,
    _main_stitch,
    _mean,
    _percent,
    _positions,
    _sample_note,
    _select,
)

# Table 1: the TLT stage by its initialisation ("Pre-train" row labels of the paper)
_TABLE1_ROWS = (("tlt", "No"), ("lfm+tlt", "LFM"), ("ffm+tlt", "FFM"))


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
            rows.append([label, *[_cell(_select(runs, position=p)) for p in positions]])
    shown = _select(stitched, stitch=stitch)
    return Table(
        f"Table 1 layout ({dataset}): TLT by stitch initialisation (Pre-train)",
        ["Pre-train / stitch position", *map(str, positions)],
        rows,
        _sample_note(shown[shown.objective.isin([o for o, _ in present])]),
    )


def _table6(stitched, probes, directions, stitch, dataset) -> Table | None:
    present = [o for o in ("lfm", "ffm") if o in set(stitched.objective)]
    if not present:
        return None
    positions = _positions(_select(stitched, stitch=stitch))
    encoders = list(dict.fromkeys(k for pair in directions for k in pair))
    rows = [
        [f"{key} linear probe", *[_cell(_select(probes, source=key))] * len(positions)]
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
                    *[_cell(_select(runs, position=p)) for p in positions],
                ]
            )
    shown = _select(stitched, stitch=stitch)
    return Table(
        f"Table 6 layout ({dataset}): layer vs final feature matching, linear-probe evaluation",
        ["model / stitch position", *map(str, positions)],
        rows,
        _sample_note(pd.concat([probes, shown[shown.objective.isin(present)]])),
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
                    *[_cell(_select(these, position=p)) for p in positions],
                ]
            )
    return Table(
        f"Table 3 layout ({dataset}): stitch families ({OBJECTIVE_LABELS.get(objective)})",
        ["direction", "stitch", *map(str, positions)],
        rows,
        _sample_note(runs),
    )


def _table2(frame: pd.DataFrame) -> Table | None:
    """Rows: self-stitches then stitched directions; columns: datasets; cells over positions."""
    ok = frame[frame.kind.isin(["stitch", "self_stitch"])]
    if ok.empty:
        return None
    datasets = list(dict.fromkeys(ok.dataset))
    header, cells, shown = ["model"], {}, []
    for dataset in datasets:
        runs = ok[ok.dataset == dataset]
        objective, stitch = _main_objective(runs), _main_stitch(runs)
        runs = _select(runs, objective=objective, stitch=stitch)
        shown.append(runs)
        positions = _positions(runs)
        task = runs.task.iloc[0] if len(runs) else "cls"
        header.append(f"{dataset} ({'mIoU' if task == 'seg' else 'acc.'}) @ "
                      + " / ".join(map(str, positions)))  # fmt: skip
        for (kind, source, target), group in runs.groupby(["kind", "source", "target"]):
            values = [_cell(_select(group, position=p)) for p in positions]
            cells.setdefault((kind != "self_stitch", source, target), {})[dataset] = " / ".join(
                values
            )
    rows = [
        [_arrow(source, target), *[cells[key].get(d, "–") for d in datasets]]
        for key in sorted(cells)
        for _, source, target in [key]
    ]
    return Table(
        "Table 2 layout: self-stitch vs stitched across datasets",
        header,
        rows,
        _sample_note(pd.concat(shown)),
    )


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
