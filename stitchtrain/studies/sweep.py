"""``stitchtrain sweep``: a grid of stitch runs plus their baselines, one table of results.

A sweep config (TOML or YAML) names the encoders' stores and the grid::

    dataset = "fmow"                      # optional label for tables (default: from the stores)

    [stores]                              # encoder key -> train store (test store found beside it)
    dinov2 = "stores/train/dinov2-l-....zarr"
    siglip2 = { train = "stores/train/siglip2-l-....zarr", test = "stores/test/siglip2-l-....zarr" }

    [grid]
    pairs = [["dinov2", "siglip2"]]       # default: every pair of distinct encoders
    both_directions = true                # each pair in both directions (default true)
    positions = [2, 6, 10, 14, 18, 22]
    objectives = ["lfm", "ffm", "ffm+tlt"]
    stitches = ["mlp"]
    seeds = [0]

    [fit]                                 # FitConfig fields shared by every run
    lrs = [1e-3, 5e-3, 1e-2]              # or lr = ... (fit --lr / --lrs)
    epochs = 100

    [baselines]                           # added automatically (paper sections 3 and 4.1)
    probe = true                          # linear probe of each encoder (per seed)
    self_stitch = true                    # source->source and target->target at each position
    self_stitch_objectives = ["ffm+tlt"]  # default: the grid's objectives

Relative store paths are relative to the config file. Each grid point is one ``fit`` (or
``probe_store``) run in ``OUT/runs/<point id>`` and one task: in sequence by default, or one
``client.submit`` per point on a Dask distributed cluster (``local``, ``local:N`` or a
scheduler address). A finished point leaves ``sweep_point.json`` in its run dir; re-running
the sweep skips it. A failing point becomes a row with status "failed" and its error. The table
``OUT/results.csv`` / ``OUT/results.parquet`` (one row per point, in grid order: the point, its
metrics and its ``config.*``) is rewritten after every point and at the end.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Any

import pandas as pd

from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.data.pairing import check_geometry
from stitchtrain.data.positions import check_position
from stitchtrain.pipeline.fit import fit
from stitchtrain.scoring.probe import probe_store
from stitchtrain.train.config import OBJECTIVES, STITCHES, FitConfig, FitStopped

__all__ = [
    "SweepPoint",
    "SweepPlan",
    "load_sweep_config",
    "dataset_label",
    "plan_sweep",
    "run_point",
    "run_sweep",
    "read_results",
    "RESULT_COLUMNS",
]

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
]
_METRIC_COLUMNS = RESULT_COLUMNS[RESULT_COLUMNS.index("metric") :]
_GRID_KEYS = {"pairs", "both_directions", "positions", "objectives", "stitches", "seeds"}
_BASELINE_KEYS = {"probe", "self_stitch", "self_stitch_objectives"}
_TOP_KEYS = {"dataset", "stores", "grid", "fit", "baselines"}
# FitConfig fields the grid decides; every other field may be set in [fit]
_GRID_FIELDS = {"source", "target", "position", "out", "stitch", "objective", "seed"}
_GRID_FIELDS |= {"source_test", "target_test"}
_PROBE_FIELDS = ("lrs", "epochs", "patience", "val_fraction")
_FIT_ALIASES = {"lr": "lrs"}  # [fit] key spelled as fit's option -> the FitConfig field
_KEY = re.compile(r"^[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*$")


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: a stitch run (``kind`` "stitch" or "self_stitch") or a linear probe.

    ``config`` holds the keyword arguments of ``FitConfig`` (without ``out``) or of
    ``probe_store`` (``store_url``, ``test_store``, ...).
    """

    id: str
    kind: str
    source: str  # encoder keys of the config's [stores]
    target: str
    source_encoder: str  # encoder names from the stores
    target_encoder: str
    position: int | None
    objective: str | None
    stitch: str | None
    seed: int
    dataset: str
    task: str
    config: dict[str, Any] = field(hash=False)

    def run_dir(self, out: str | Path) -> Path:
        return Path(out) / "runs" / self.id

    def fit_config(self, out: str | Path) -> FitConfig | None:
        """The FitConfig ``run_point`` fits (None for a probe point)."""
        if self.kind == "probe":
            return None
        return FitConfig(**self.config, out=str(self.run_dir(out)))

    def fit_plan(self, out: str | Path):
        """The ``stitchtrain.pipeline.plan.FitPlan`` of this point's fit, after every check fit
        makes before training (its errors raised); None for a probe point. Writes nothing."""
        from stitchtrain.pipeline.plan import plan_fit

        config = self.fit_config(out)
        return None if config is None else plan_fit(config, self.other_runs(out))

    def other_runs(self, out: str | Path) -> list[Path]:
        """The sweep's other run dirs under ``OUT/runs``: their finished LFM / FFM stages this
        point's fit takes when they are its own (fit's shared stages)."""
        run_dir = self.run_dir(out)
        runs = run_dir.parent
        return sorted(d for d in runs.iterdir() if d != run_dir) if runs.is_dir() else []


@dataclass
class SweepPlan:
    points: list[SweepPoint]
    config: dict[str, Any]  # the config as loaded, paths resolved


# -- config ---------------------------------------------------------------------------------------
def load_sweep_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml / .yml) sweep config into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"No sweep config at {path}.")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise FeatcacheError(f"{path} is not valid TOML: {err}") from err
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:  # pragma: no cover - pyyaml is present where tests run
            raise FeatcacheError("YAML sweep configs need pyyaml (pip install pyyaml).") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise FeatcacheError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise FeatcacheError(f"Expected a mapping at the top of {path}. Got {loaded!r}.")
        return loaded
    raise FeatcacheError(f"Expected a sweep config ending in .toml, .yaml or .yml. Got {path}.")


def _unknown(section: str, given, accepted) -> None:
    extra = sorted(set(given) - set(accepted))
    if extra:
        raise FeatcacheError(
            f"Unknown key(s) {extra} in sweep config [{section}]. Accepted: {sorted(accepted)}."
        )


def _fit_section(section: dict) -> dict[str, Any]:
    """[fit] with fit's option spellings accepted: ``lr`` (``fit --lr``) for the FitConfig field
    ``lrs``, one number or a list."""
    shared = dict(section)
    for alias, name in _FIT_ALIASES.items():
        if alias in shared:
            if name in shared:
                raise FeatcacheError(
                    f"Expected one of [fit] {alias} and {name} (one setting, two spellings). "
                    "Got both."
                )
            shared[name] = shared.pop(alias)
    if "lrs" in shared and not isinstance(shared["lrs"], (list, tuple)):
        shared["lrs"] = [shared["lrs"]]
    return shared


def _resolve(url: str, base: Path) -> str:
    if "://" in url or os.path.isabs(url):
        return url
    return str((base / url).resolve())


def _stores(config: dict, base: Path) -> dict[str, dict[str, str | None]]:
    stores = config.get("stores")
    if not isinstance(stores, dict) or not stores:
        raise FeatcacheError(
            "Expected a [stores] table naming each encoder's train store, e.g. "
            'dinov2 = "stores/train/dinov2.zarr". Got none.'
        )
    resolved = {}
    for key, value in stores.items():
        if not _KEY.match(key):
            raise FeatcacheError(
                f"Expected encoder keys of letters, digits, '_', '.' and single '-'. Got {key!r}."
            )
        if isinstance(value, str):
            value = {"train": value}
        if not isinstance(value, dict) or "train" not in value:
            raise FeatcacheError(
                f"Expected [stores] {key} = PATH or {{ train = PATH, test = PATH }}. Got {value!r}."
            )
        _unknown(f"stores.{key}", value, {"train", "test"})
        resolved[key] = {
            "train": _resolve(str(value["train"]), base),
            "test": _resolve(str(value["test"]), base) if value.get("test") else None,
        }
    return resolved


def dataset_label(attrs: dict[str, Any]) -> str:
    """A short dataset name from a store's attrs: the folder of its manifest, or its name."""
    source = str(attrs["dataset"]["source"]).rstrip("/")
    path = Path(source)
    return path.parent.name if path.suffix in (".csv", ".json", ".jsonl") else path.name


def _as_list(value, name: str) -> list:
    if value is None:
        raise FeatcacheError(f"Expected [grid] {name} in the sweep config. Got none.")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def plan_sweep(config: dict[str, Any], base: str | Path = ".") -> SweepPlan:
    """Expand a sweep config into its grid points (baselines included), in a fixed order:
    probes, then per direction, objective, stitch, position, seed; self-stitches last."""
    base = Path(base)
    _unknown("top level", config, _TOP_KEYS)
    stores = _stores(config, base)
    grid = dict(config.get("grid") or {})
    _unknown("grid", grid, _GRID_KEYS)
    shared = _fit_section(config.get("fit") or {})
    fit_fields = {f.name for f in fields(FitConfig)}
    _unknown("fit", shared, fit_fields - _GRID_FIELDS)
    baselines = {"probe": True, "self_stitch": True, **(config.get("baselines") or {})}
    _unknown("baselines", baselines, _BASELINE_KEYS)

    keys = list(stores)
    pairs = [tuple(p) for p in grid.get("pairs") or [(a, b) for a in keys for b in keys if a < b]]
    for pair in pairs:
        if len(pair) != 2 or any(k not in stores for k in pair):
            raise FeatcacheError(
                f"Expected [grid] pairs of encoder keys from [stores] {keys}. Got {list(pair)}."
            )
    if grid.get("both_directions", True):
        pairs += [(b, a) for a, b in pairs if (b, a) not in pairs]
    positions = [int(p) for p in _as_list(grid.get("positions"), "positions")]
    objectives = [str(o) for o in grid.get("objectives") or ["ffm+tlt"]]
    stitches = [str(s) for s in grid.get("stitches") or ["mlp"]]
    seeds = [int(s) for s in grid.get("seeds") or [0]]
    for value, allowed, name in (
        (objectives, OBJECTIVES, "objectives"),
        (stitches, STITCHES, "stitches"),
    ):
        bad = [v for v in value if v not in allowed]
        if bad:
            raise FeatcacheError(f"Expected [grid] {name} in {allowed}. Got {bad} instead.")
    self_objectives = [str(o) for o in baselines.get("self_stitch_objectives") or objectives]
    task = str(shared.get("task", "cls"))

    attrs = {key: FeatureStore.open(urls["train"]).attrs for key, urls in stores.items()}
    names = {key: a["encoder"]["name"] for key, a in attrs.items()}
    dataset = str(config.get("dataset") or dataset_label(next(iter(attrs.values()))))
    defaults = FitConfig(source="", target="", position=1, out="", **shared)  # validates [fit]

    def point(kind, source, target, objective=None, stitch=None, position=None, seed=0):
        common = {
            "kind": kind,
            "source": source,
            "target": target,
            "source_encoder": names[source],
            "target_encoder": names[target],
            "position": position,
            "objective": objective,
            "stitch": stitch,
            "seed": seed,
            "dataset": dataset,
            "task": task,
        }
        if kind == "probe":
            probe_kwargs = {
                "store_url": stores[source]["train"],
                "test_store": stores[source]["test"],
                "seed": seed,
                **{k: getattr(defaults, k) for k in _PROBE_FIELDS},
            }
            return SweepPoint(id=f"probe--{source}--s{seed}", config=probe_kwargs, **common)
        fit_kwargs = {
            **shared,
            "source": stores[source]["train"],
            "target": stores[target]["train"],
            "source_test": stores[source]["test"],
            "target_test": stores[target]["test"],
            "position": position,
            "stitch": stitch,
            "objective": objective,
            "seed": seed,
        }
        name = f"{source}--{target}--{objective.replace('+', '-')}--{stitch}--n{position}--s{seed}"
        return SweepPoint(id=name, config=fit_kwargs, **common)

    directions = [(s, t) for s, t in pairs if s != t]
    for source, target in directions:  # refused here, before any point runs
        check_geometry(
            FeatureStore.open(stores[source]["train"]),
            FeatureStore.open(stores[target]["train"]),
            allow_mismatch=defaults.allow_geometry_mismatch,
        )
    encoders = list(dict.fromkeys(k for pair in pairs for k in pair))
    points: list[SweepPoint] = []
    if baselines["probe"] and task == "cls":
        points += [point("probe", key, key, seed=seed) for key in encoders for seed in seeds]
    for (source, target), objective, stitch, position, seed in product(
        directions, objectives, stitches, positions, seeds
    ):
        points.append(point("stitch", source, target, objective, stitch, position, seed))
    self_keys = encoders if baselines["self_stitch"] else [s for s, t in pairs if s == t]
    for source, target in [*directions, *((key, key) for key in self_keys)]:  # before any runs
        for position in positions:
            depths = (attrs[source]["encoder"]["depth"], attrs[target]["encoder"]["depth"])
            check_position(position, *depths, names[source], names[target])
    for key, objective, stitch, position, seed in product(
        self_keys, self_objectives, stitches, positions, seeds
    ):
        points.append(point("self_stitch", key, key, objective, stitch, position, seed))
    unique = list({p.id: p for p in points}.values())
    resolved = {**config, "stores": stores, "dataset": dataset}
    return SweepPlan(unique, resolved)


# -- one point (module level: Dask workers import it) -------------------------------------------
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
    row.update(_flatten_config(point.config))
    return row


def _point_record(point: SweepPoint) -> dict:
    return json.loads(json.dumps(asdict(point)))


def _finished_run(point: SweepPoint, run_dir: Path) -> dict | None:
    """metrics.json of a run dir that finished with this point's config (the sweep was
    stopped before it could write sweep_point.json), else None."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
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
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
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
    progress callback (``stitchtrain.train.fit.fit``) for a stitch point, which takes an LFM / FFM
    stage another point of the sweep finished when it is the same (fit's shared stages)."""
    run_dir = point.run_dir(out)
    started = time.perf_counter()
    try:
        if point.kind == "probe":
            kwargs = dict(point.config)
            metrics = probe_store(kwargs.pop("store_url"), run_dir, **kwargs)
        else:
            metrics = fit(point.fit_config(out), fit_progress, reuse=point.other_runs(out))
    except FitStopped:  # a SIGTERM stops the sweep, not just this point
        raise
    except Exception as err:  # a failed point is recorded and the sweep goes on
        message = f"{type(err).__name__}: {err}"
        if not isinstance(err, FeatcacheError):
            message += "\n" + "".join(traceback.format_exception(err)[-3:])
        return _row(point, "failed", {}, time.perf_counter() - started, message.strip())
    row = _row(point, "ok", metrics, time.perf_counter() - started)
    _write_marker(run_dir, point, row)
    return row


# -- the table ------------------------------------------------------------------------------------
def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = None
    config_columns = sorted(c for c in frame.columns if c.startswith("config."))
    rest = [c for c in frame.columns if c not in RESULT_COLUMNS and c not in config_columns]
    frame = frame[RESULT_COLUMNS + sorted(rest) + config_columns]
    for column in frame.columns:  # one type per column for Parquet: text columns stay text
        if frame[column].dtype == object:
            values = frame[column].dropna()
            if len(values) and not values.map(lambda v: isinstance(v, str)).all():
                frame[column] = frame[column].map(lambda v: v if v is None else str(v))
    for column in ("position", "seed", "test_images"):
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
        for point in pending:
            fit_progress = None if started is None else started(point)
            finished(point, run_point(point, str(out), fit_progress))
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
