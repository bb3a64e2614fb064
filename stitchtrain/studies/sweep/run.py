"""Running a sweep: one point (``run_point``), the points already finished (``completed_row``)
and every point of a plan, in sequence or on a Dask cluster (``run_sweep``).

In sequence, a SIGINT (Ctrl-C) or SIGTERM stops the sweep: the point in progress finishes its
epoch and is checkpointed (a probe point finishes), no other point starts, and ``Interrupted``
says how many points are finished (kept: a re-run skips them) and that the same command
resumes; a second signal stops at once, the point in progress keeping its last checkpoint
(``featcache.interrupts``)."""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from featcache.errors import FeatcacheError, Interrupted
from featcache.interrupts import stop_on_signal, stop_requested
from stitchtrain.pipeline.fit import fit
from stitchtrain.scoring.probe import probe_store
from stitchtrain.studies.sweep.config import _PROBE_FIELDS
from stitchtrain.studies.sweep.grid import SweepPlan, SweepPoint
from stitchtrain.studies.sweep.results import _row, _write_table
from stitchtrain.train.config import FitConfig
from stitchtrain.train.rundir import read_json

__all__ = ["completed_row", "run_point", "run_sweep"]


# -- one point (module level: Dask workers import it) -------------------------------------------
def _point_record(point: SweepPoint) -> dict:
    return json.loads(json.dumps(asdict(point)))


def _finished_run(point: SweepPoint, run_dir: Path) -> dict | None:
    """metrics.json of a run dir that finished with this point's config (the sweep was
    stopped before it could write sweep_point.json), else None."""
    try:
        saved = read_json(run_dir / "config.json")
        metrics = read_json(run_dir / "metrics.json")
    except (OSError, ValueError):  # not JSON, nested too deeply included: not a finished run
        return None
    config = point.config
    if point.kind == "probe":
        want = {k: config[k] for k in ("seed", *_PROBE_FIELDS)}
        want = {**json.loads(json.dumps(want)), "store": config["store_url"]}
        if config["test_store"]:
            want["test_store"] = config["test_store"]
        return metrics if all(saved.get(k) == v for k, v in want.items()) else None
    want = json.loads(json.dumps(asdict(FitConfig(**config, out=str(run_dir)))))
    return metrics if saved == want and (run_dir / "stitch.safetensors").is_file() else None


def completed_row(point: SweepPoint, out: str | Path) -> dict | None:
    """The row of a point already finished in ``out`` with the same spec, else None."""
    run_dir = point.run_dir(out)
    marker = run_dir / "sweep_point.json"
    try:
        saved = read_json(marker)
    except (OSError, ValueError):
        saved = {}
    if saved.get("point") == _point_record(point):
        return saved["row"]
    metrics = _finished_run(point, run_dir)
    if metrics is None:
        return None
    row = _row(point, "ok", metrics, 0.0)
    _write_marker(run_dir, point, row)
    return row


def _write_marker(run_dir: Path, point: SweepPoint, row: dict) -> None:
    tmp = run_dir / "sweep_point.json.partial"
    tmp.write_text(json.dumps({"point": _point_record(point), "row": row}, indent=2))
    os.replace(tmp, run_dir / "sweep_point.json")


def run_point(point: SweepPoint, out: str, fit_progress=None) -> dict[str, Any]:
    """Run one grid point in ``OUT/runs/<id>``; return its table row (never raises on a
    failed run: the row says "failed" and carries the error). ``fit_progress``: fit's
    progress callback (``stitchtrain.pipeline.fit.fit``) for a stitch point, which takes an
    LFM / FFM stage another point of the sweep finished when it is the same (fit's shared
    stages)."""
    run_dir = point.run_dir(out)
    started = time.perf_counter()
    try:
        if point.kind == "probe":
            kwargs = dict(point.config)
            metrics = probe_store(kwargs.pop("store_url"), run_dir, **kwargs)
        else:
            metrics = fit(point.fit_config(out), fit_progress, reuse=point.other_runs(out))
    except Interrupted:  # a SIGINT / SIGTERM stops the sweep, not just this point
        raise
    except Exception as err:  # a failed point is recorded and the sweep goes on
        message = f"{type(err).__name__}: {err}"
        if not isinstance(err, FeatcacheError):
            message += "\n" + "".join(traceback.format_exception(err)[-3:])
        return _row(point, "failed", {}, time.perf_counter() - started, message.strip())
    row = _row(point, "ok", metrics, time.perf_counter() - started)
    _write_marker(run_dir, point, row)
    return row


# -- running --------------------------------------------------------------------------------------
def _client(scheduler: str):
    """(client, cluster or None) for "local", "local:N" or a scheduler address."""
    from distributed import Client, LocalCluster

    if scheduler == "local" or scheduler.startswith("local:"):
        workers = scheduler.partition(":")[2]
        if workers and not workers.isdigit():
            raise FeatcacheError(f"Expected --scheduler local:N. Got {scheduler!r} instead.")
        cluster = LocalCluster(
            n_workers=int(workers) if workers else None,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        )
        return Client(cluster), cluster
    if "://" not in scheduler:
        raise FeatcacheError(
            "Expected --scheduler local, local:N or a scheduler address such as "
            f"tcp://HOST:8786. Got {scheduler!r} instead."
        )
    return Client(scheduler), None


def _sweep_stopped(
    signal_name: str, out: Path, done: int, total: int, point: SweepPoint, err: Interrupted | None
) -> Interrupted:
    """The one-line ``Interrupted`` of a stopped sweep: the points finished and kept, the
    point that was in progress (``err``: how its fit stopped) and that the command resumes."""
    kept = f"{done} of {total} points of the sweep in {out} are finished and kept"
    if err is None:
        message = f"Stopped by {signal_name}: {kept}; the same command resumes at {point.id}."
    else:
        message = f"{err} Sweep point {point.id}: {kept}; the same command resumes the sweep."
    kind = Interrupted if err is None else type(err)  # a fit's stop stays a FitStopped
    return kind(message, signal_name, at_once=err is not None and err.at_once)


ProgressFn = Callable[[dict, int, int], None]
StartFn = Callable[[SweepPoint], Callable[[dict], None] | None]


def run_sweep(
    plan: SweepPlan,
    out: str | Path,
    *,
    scheduler: str | None = None,
    progress: ProgressFn | None = None,
    started: StartFn | None = None,
) -> pd.DataFrame:
    """Run every point of ``plan`` not yet finished in ``out``; return the whole table.

    ``scheduler``: None or "sequential" (in this process), "local" / "local:N" (a
    ``LocalCluster`` of N one-thread worker processes) or an address ("tcp://HOST:PORT").
    ``progress(row, done, total)`` is called as points finish (skipped ones included).
    ``started(point)``, in sequence only, as a point starts: it may return a fit progress
    callback for that point's fit (``run_point``'s ``fit_progress``).
    """
    out = Path(out).resolve()  # run dirs record absolute paths: workers may run elsewhere
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(plan.config, indent=2, default=str))
    rows: dict[str, dict] = {}
    pending = []
    total = len(plan.points)
    for point in plan.points:
        saved = completed_row(point, out)
        if saved is not None:
            rows[point.id] = {**saved, "skipped": True}
            if progress is not None:
                progress(rows[point.id], len(rows), total)
        else:
            pending.append(point)

    def finished(point: SweepPoint, row: dict) -> None:
        rows[point.id] = {**row, "skipped": False}
        _write_table(out, [rows[p.id] for p in plan.points if p.id in rows])
        if progress is not None:
            progress(rows[point.id], len(rows), total)

    if scheduler in (None, "sequential"):
        with stop_on_signal("stopping the sweep after the epoch in progress, checkpointed"):
            for point in pending:
                if stop_requested():  # arrived between two points: none is in progress
                    raise _sweep_stopped(stop_requested(), out, len(rows), total, point, None)
                fit_progress = None if started is None else started(point)
                try:
                    row = run_point(point, str(out), fit_progress)
                except Interrupted as err:
                    stopped = _sweep_stopped(err.signal_name, out, len(rows), total, point, err)
                    raise stopped from err
                finished(point, row)
    elif pending:
        from distributed import as_completed

        client, cluster = _client(scheduler)
        try:
            futures = {client.submit(run_point, p, str(out), pure=False): p for p in pending}
            for future in as_completed(futures):
                point = futures[future]
                try:
                    row = future.result()
                except Exception as err:  # the task itself died (worker lost, unpicklable)
                    row = _row(point, "failed", {}, 0.0, f"{type(err).__name__}: {err}")
                finished(point, row)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    return _write_table(out, [rows[p.id] for p in plan.points])
