"""A sweep's results table: one row per point (``_row``), written as results.csv and
results.parquet (``_write_table``) and read back (``read_results``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from featcache.errors import FeatcacheError
from stitchtrain.scoring.intervals import wilson_interval
from stitchtrain.studies.sweep.grid import SweepPoint

__all__ = ["RESULT_COLUMNS", "read_results"]

# the point's own columns, then metrics; ``config.<field>`` columns follow
RESULT_COLUMNS = [
    "id",
    "kind",
    "source",
    "target",
    "source_encoder",
    "target_encoder",
    "position",
    "objective",
    "stitch",
    "seed",
    "dataset",
    "task",
    "status",
    "error",
    "seconds",
    "run_dir",
    "metric",
    "test_accuracy",
    "test_miou",
    "test_pixel_accuracy",
    "layer_distance",
    "final_distance",
    "pooled_distance",
    "evaluation",
    "test_images",
    "lr",
    "val_loss",
    "val_metric",
    "metric_n",
    "metric_low",
    "metric_high",
    "below_chance",
]
_METRIC_COLUMNS = RESULT_COLUMNS[RESULT_COLUMNS.index("metric") :]


def _flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple, dict)):
            value = json.dumps(list(value) if isinstance(value, tuple) else value)
        flat[f"config.{key}"] = value
    return flat


def _row(point: SweepPoint, status: str, metrics: dict, seconds: float, error=None) -> dict:
    row: dict[str, Any] = {
        "id": point.id,
        "kind": point.kind,
        "source": point.source,
        "target": point.target,
        "source_encoder": point.source_encoder,
        "target_encoder": point.target_encoder,
        "position": point.position,
        "objective": point.objective,
        "stitch": point.stitch,
        "seed": point.seed,
        "dataset": point.dataset,
        "task": point.task,
        "status": status,
        "error": error,
        "seconds": round(seconds, 3),
        "run_dir": f"runs/{point.id}",
    }
    for key in _METRIC_COLUMNS:
        value = metrics.get(key)
        row[key] = value if isinstance(value, (int, float, str)) or value is None else str(value)
    if point.kind == "probe":
        row["lr"] = metrics.get("lr")
        row["val_metric"] = metrics.get("val_accuracy")
    else:
        final = (metrics.get("stages") or {}).get(metrics.get("final_stage") or "", {})
        row["lr"], row["val_loss"] = final.get("lr"), final.get("val_loss")
        row["val_metric"] = final.get("val_metric")
    row["metric"] = metrics.get("test_accuracy", metrics.get("test_miou"))
    row.update(_interval_columns(metrics))
    row.update(_flatten_config(point.config))
    return row


def _interval_columns(metrics: dict) -> dict[str, Any]:
    """metric_n, metric_low, metric_high (the 95% interval) and below_chance of a run's
    metrics: its ``test_interval``, else (runs and probes that do not record one) the Wilson
    interval of ``test_accuracy`` over ``test_images``, below_chance then unknown."""
    interval = metrics.get("test_interval")
    if isinstance(interval, dict):
        return {
            "metric_n": interval.get("n"),
            "metric_low": interval.get("low"),
            "metric_high": interval.get("high"),
            "below_chance": interval.get("below_chance"),
        }
    accuracy, n = metrics.get("test_accuracy"), metrics.get("test_images")
    if isinstance(accuracy, (int, float)) and isinstance(n, int) and n > 0:
        low, high = wilson_interval(round(accuracy * n), n)
        return {"metric_n": n, "metric_low": low, "metric_high": high, "below_chance": None}
    return {}


# -- the table ------------------------------------------------------------------------------------
def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = None
    config_columns = sorted(c for c in frame.columns if c.startswith("config."))
    rest = [c for c in frame.columns if c not in RESULT_COLUMNS and c not in config_columns]
    frame = frame[RESULT_COLUMNS + sorted(rest) + config_columns]
    frame["below_chance"] = frame["below_chance"].astype("boolean")
    for column in frame.columns:  # one type per column for Parquet: text columns stay text
        if frame[column].dtype == object:
            values = frame[column].dropna()
            if len(values) and not values.map(lambda v: isinstance(v, str)).all():
                frame[column] = frame[column].map(lambda v: v if v is None else str(v))
    for column in ("position", "seed", "test_images", "metric_n"):
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    numeric = [
        "seconds",
        "metric",
        "test_accuracy",
        "test_miou",
        "test_pixel_accuracy",
        "layer_distance",
        "final_distance",
        "pooled_distance",
        "lr",
        "val_loss",
        "val_metric",
        "metric_low",
        "metric_high",
    ]
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column]).astype("float64")
    return frame


def _write_table(out: Path, rows: list[dict]) -> pd.DataFrame:
    frame = _frame(rows)
    for name, write in (
        ("results.csv", lambda p: frame.to_csv(p, index=False)),
        ("results.parquet", lambda p: frame.to_parquet(p, index=False)),
    ):
        tmp = out / f".{name}.partial"
        write(tmp)
        os.replace(tmp, out / name)
    return frame


def read_results(sweep_dir: str | Path) -> pd.DataFrame:
    """A sweep's results table (Parquet when present, else CSV)."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "results.parquet").is_file():
        return pd.read_parquet(sweep_dir / "results.parquet")
    if (sweep_dir / "results.csv").is_file():
        return pd.read_csv(sweep_dir / "results.csv")
    raise FeatcacheError(
        f"No results.parquet or results.csv in {sweep_dir}: not a sweep output dir "
        "(stitchtrain sweep CONFIG --out DIR writes them)."
    )
