"""Planning a sweep: its grid points (``SweepPoint``, baselines included) and ``plan_sweep``,
which expands a config into them, every check made before any point runs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.data.names import encoder_label
from stitchtrain.data.pairing import check_geometry, check_same_images
from stitchtrain.data.positions import check_position
from stitchtrain.studies.sweep.config import (
    _BASELINE_KEYS,
    _GRID_FIELDS,
    _GRID_KEYS,
    _PROBE_FIELDS,
    _TOP_KEYS,
    _as_list,
    _fit_section,
    _stores,
    _unknown,
    dataset_label,
)
from stitchtrain.train.config import OBJECTIVES, STITCHES, FitConfig

__all__ = ["SweepPlan", "SweepPoint", "plan_sweep"]


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
    source_encoder: str  # encoder names from the stores (a hybrid by its label)
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
    names = {key: encoder_label(a["encoder"]) for key, a in attrs.items()}
    dataset = str(config.get("dataset") or dataset_label(next(iter(attrs.values()))))
    defaults = FitConfig(source="", target="", position=1, out="", **shared)  # validates [fit]
    _no_weights_twice(stores, shared)

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
            **_store_weights(stores[source]["weights"], stores[target]["weights"]),
            "position": position,
            "stitch": stitch,
            "objective": objective,
            "seed": seed,
        }
        name = f"{source}--{target}--{objective.replace('+', '-')}--{stitch}--n{position}--s{seed}"
        return SweepPoint(id=name, config=fit_kwargs, **common)

    directions = [(s, t) for s, t in pairs if s != t]
    for source, target in directions:  # refused here, before any point runs
        train = (
            FeatureStore.open(stores[source]["train"]),
            FeatureStore.open(stores[target]["train"]),
        )
        check_same_images(*train)  # the same images in the same rows: ids and row digests
        check_geometry(*train, allow_mismatch=defaults.allow_geometry_mismatch)
        if stores[source]["test"] and stores[target]["test"]:
            check_same_images(
                FeatureStore.open(stores[source]["test"]), FeatureStore.open(stores[target]["test"])
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


def _store_weights(source: str | None, target: str | None) -> dict[str, str]:
    """The fit weights a point takes from its stores' ``weights`` (none given: [fit]'s)."""
    named = {"source_weights": source, "target_weights": target}
    return {field: path for field, path in named.items() if path is not None}


def _no_weights_twice(stores: dict, shared: dict) -> None:
    """Weights come from [fit] (one file for every point) or from each store, never both."""
    given = [key for key, urls in stores.items() if urls["weights"] is not None]
    fit_weights = [f for f in ("source_weights", "target_weights") if shared.get(f) is not None]
    if given and fit_weights:
        raise FeatcacheError(
            f"Expected weights beside each store in [stores] or in [fit], not both. Got [stores] "
            f"weights for {given} and [fit] {', '.join(fit_weights)}."
        )
