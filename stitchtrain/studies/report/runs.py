"""The sweep rows a report reads: loading them (``load_results``), selecting and summarising
runs, the main objective and stitch family, and one dataset's runs (``_DatasetRuns``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from featcache.errors import FeatcacheError
from stitchtrain.studies.sweep.results import read_results

__all__ = ["BELOW_CHANCE", "OBJECTIVE_LABELS", "load_results"]

OBJECTIVE_LABELS = {
    "lfm": "LFM",
    "ffm": "FFM",
    "tlt": "TLT",
    "lfm+tlt": "LFM+TLT",
    "ffm+tlt": "FFM+TLT",
}


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


BELOW_CHANCE = "▼"  # marks a value significantly below chance (scoring.intervals.below_chance)


def _cell(frame: pd.DataFrame) -> str:
    """A table cell of runs' test metric in %: one run: value and its 95% interval
    (``83.3 [55.2–95.3]``); several seeds: ``mean ± std``; ``BELOW_CHANCE`` after it when
    every run is significantly below chance; "–" without a value."""
    runs = frame[frame.metric.notna()] if "metric" in frame else frame.iloc[:0]
    if runs.empty:
        return "–"
    text = _percent(runs.metric)
    if len(runs) == 1 and "metric_low" in runs and pd.notna(runs.metric_low.iloc[0]):
        text += f" [{runs.metric_low.iloc[0] * 100:.1f}–{runs.metric_high.iloc[0] * 100:.1f}]"
    below = runs.below_chance if "below_chance" in runs else pd.Series(dtype="boolean")
    if len(below) and below.notna().all() and below.astype(bool).all():
        text += f" {BELOW_CHANCE}"
    return text


def _sample_note(frame: pd.DataFrame) -> str:
    """The note under a table of ``frame``'s runs: how many test images each value rests on
    and what the brackets and marks mean."""
    counts = sorted({int(n) for n in frame.metric_n.dropna()}) if "metric_n" in frame else []
    if not counts:
        return "Test images per value: not recorded."
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    note = (
        f"Each value rests on n = {n} test images; [low–high]: its 95% interval (Wilson for "
        "accuracy, bootstrap over images for mIoU); mean ± std over seeds where there are "
        "several."
    )
    if "below_chance" in frame and frame.below_chance.fillna(False).astype(bool).any():
        note += f" {BELOW_CHANCE}: significantly below chance (upper bound under 1 / classes)."
    return note


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


def _curve(frame: pd.DataFrame, column: str) -> tuple[list[int], list[float]]:
    """(positions, mean of ``column`` over seeds) sorted by position, NaNs dropped."""
    grouped = frame.groupby("position")[column].mean().dropna().sort_index()
    return [int(p) for p in grouped.index], [float(v) for v in grouped.to_numpy()]


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


def _directions(stitched: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(stitched.source, stitched.target, strict=True)))


def _pairs(directions) -> list[tuple[str, str]]:
    pairs = []
    for source, target in directions:
        if (source, target) not in pairs and (target, source) not in pairs:
            pairs.append((source, target))
    return pairs


@dataclass
class _DatasetRuns:
    """The finished runs of one dataset, split by kind, and what the report derives from them."""

    dataset: str
    probes: pd.DataFrame
    stitched: pd.DataFrame
    selfs: pd.DataFrame
    task: str
    objective: str | None  # the main objective (package docstring)
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
