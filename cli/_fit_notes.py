"""What ``fit`` says beside its numbers: the test metric's n and 95% interval
(``interval_rows``) and a warning when a learning rate was chosen on a tiny validation split
(``selection_warnings``). Reads a run's metrics only; changes no number."""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_VALIDATION_ROWS", "interval_rows", "selection_warnings"]

TINY_VALIDATION_ROWS = 30  # fewer validation rows than this choose a learning rate by chance

# stitchtrain.train.stages._better: how one learning rate wins over another
_TIE_BREAK = {
    "tlt": "higher validation metric, then lower validation loss, then the earlier rate of "
    "the grid",
    "matching": "lower validation loss, then the earlier rate of the grid",
}


def interval_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows for the metrics table from ``test_interval``: n, the interval and
    its method, and a below-chance line when the score is significantly below chance."""
    interval = metrics.get("test_interval")
    if not isinstance(interval, dict):
        return []
    name = interval["metric"]
    rows = [
        (f"{name} n", f"{interval['n']} test images"),
        (
            f"{name} 95% interval",
            f"[{interval['low']:.4f}, {interval['high']:.4f}] ({interval['method']})",
        ),
    ]
    if interval.get("below_chance"):
        rows.append(
            (
                f"{name} below chance",
                f"yes: even the upper bound is under chance {interval['chance']:.4f} (1 / classes)",
            )
        )
    return rows


def _rates(rows: list[dict]) -> str:
    return ", ".join(format(row["lr"], "g") for row in rows)


def selection_warnings(metrics: dict[str, Any]) -> list[str]:
    """One line per stage whose learning rate was chosen from a grid of several on fewer than
    ``TINY_VALIDATION_ROWS`` validation rows: the rule that chose, and the tie when the
    deciding validation value was equal for several rates."""
    rows = metrics.get("val_rows")
    if not isinstance(rows, int) or rows >= TINY_VALIDATION_ROWS:
        return []
    lines = []
    for stage, result in (metrics.get("stages") or {}).items():
        grid = result.get("grid") or []
        if len(grid) < 2:
            continue
        key = "val_metric" if stage == "tlt" else "val_loss"
        chosen = next((row for row in grid if row["lr"] == result["lr"]), None)
        tied = [row for row in grid if chosen is not None and row.get(key) == chosen.get(key)]
        line = (
            f"warning: {stage} chose lr {result['lr']:g} of "
            f"{_rates(grid)} on {rows} validation rows (under "
            f"{TINY_VALIDATION_ROWS}: the choice may be chance); rule: "
            f"{_TIE_BREAK['tlt' if stage == 'tlt' else 'matching']}"
        )
        if len(tied) > 1:
            value = chosen[key]
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            line += f". The {key.replace('_', ' ')} tied at {shown} for lr {_rates(tied)}"
        lines.append(line + ".")
    return lines
