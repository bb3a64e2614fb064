"""Analyses of finished runs: per-image predictions (paper B.4, Table 12) and task-agnostic
stitching (section 5.4, Table 4).

predictions   ``run_predictions(run_dir)`` recomputes a run's test-split class predictions the
              way ``stitchtrain eval`` scores them (the run's TLT head, or the same seeded
              linear probe on the stitched pooled outputs; a ``probe`` run dir: its head on the
              store's pooled features) and saves ``predictions.npy``: int64, one entry per row
              of the test store, -1 for rows that are not valid.
scenarios     ``count_scenarios`` partitions the images on which a stitched model and its two
              self-stitch baselines (A, B) do not all agree on correctness into Table 12's six
              columns, (A, B, stitched) right (R) or wrong (W):
                  WRR RWR   preserve       one baseline right, the stitched model right too
                  WWR       rescue         both baselines wrong, the stitched model right
                  RRW RWW WRW interference  a baseline right, the stitched model wrong
              and, where A and B predict different classes, whose prediction it follows.
transfer      ``transfer_run`` applies a run's FFM stitch (``stitch-ffm.safetensors``) to
              another dataset's stores of the same two encoders and scores it by a linear
              probe on the stitched pooled outputs (no TLT), as the paper's T-Agn. column.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.data.loader import valid_rows
from stitchtrain.data.names import encoder_label
from stitchtrain.train.rundir import read_json_object

__all__ = [
    "SCENARIOS",
    "run_predictions",
    "count_scenarios",
    "prediction_analysis",
    "transfer_run",
    "read_transfers",
]

# Table 12's columns: (baseline A, baseline B, stitched), in the paper's order
SCENARIOS = (
    ("WRR", "preserve"),
    ("RWR", "preserve"),
    ("WWR", "rescue"),
    ("RRW", "interference"),
    ("RWW", "interference"),
    ("WRW", "interference"),
)


def _predictions_test_store(path: Path) -> str:
    """The test store URL a ``predictions.json`` names (one-line error for a damaged file)."""
    store = read_json_object(path, "a predictions record", "Run predictions again.").get(
        "test_store"
    )
    if not isinstance(store, str):
        raise FeatcacheError(f"Expected {path} to name its test_store. Got {store!r} instead.")
    return store


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FeatcacheError(f"No config.json in {run_dir}: not a stitchtrain run dir.")
    return read_json_object(path, "a run's config (a JSON object)", "Is it a stitchtrain run dir?")


def _rebuild(run_dir: Path, **overrides):
    """The run's ``StitchRecipe`` with its trained stitch (and head) loaded."""
    from stitchtrain.evaluate.evaluation import load_run

    return load_run(run_dir, **overrides)


def _probe_head(recipe) -> torch.nn.Module:
    """The linear probe ``stitchtrain eval`` fits on the stitched pooled outputs (same seed,
    same protocol, so the same head)."""
    from stitchtrain.evaluate.evaluation import fit_stitched_probe

    return fit_stitched_probe(recipe).head


def _stitched_predictions(run_dir: Path) -> tuple[np.ndarray, str]:
    from stitchtrain.evaluate.evaluation import stitched_pass, test_stores

    recipe = _rebuild(run_dir)
    if recipe.config.task != "cls":
        raise FeatcacheError(
            f"{run_dir} is a {recipe.config.task} run: prediction analysis compares class "
            "predictions (--task cls)."
        )
    head = recipe.head if recipe.stages[-1] == "tlt" else _probe_head(recipe)
    head.eval()
    test_source, test_target = test_stores(recipe)
    rows = valid_rows(test_source, test_target)
    predictions = np.full(test_target.num_images, -1, np.int64)
    done = 0
    with torch.no_grad():
        for _, _, pooled in stitched_pass(recipe, test_source, test_target, rows, []):
            predicted = head(pooled).argmax(-1).cpu().numpy()
            predictions[rows[done : done + len(predicted)]] = predicted  # batches in row order
            done += len(predicted)
    return predictions, test_target.url


@torch.no_grad()
def _probe_predictions(run_dir: Path, config: dict) -> tuple[np.ndarray, str]:
    test = FeatureStore.open(config["test_store"])
    state = load_file(str(run_dir / "head.safetensors"))
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    rows = valid_rows(test)
    predictions = np.full(test.num_images, -1, np.int64)
    pooled = torch.from_numpy(test.read("pooled", rows))
    predictions[rows] = head(pooled).argmax(-1).numpy()
    return predictions, test.url


def run_predictions(run_dir: str | Path, *, force: bool = False) -> np.ndarray:
    """Test-split class predictions of a finished run (or probe) dir, cached in
    ``predictions.npy`` (row-aligned with the test store, -1 for invalid rows)."""
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    cache = run_dir / "predictions.npy"
    weights = run_dir / ("head.safetensors" if "store" in config else "stitch.safetensors")
    if (
        not force
        and cache.is_file()
        and weights.is_file()
        and cache.stat().st_mtime >= weights.stat().st_mtime
    ):
        return np.load(cache)
    if "store" in config:  # a linear-probe run dir (probe_store)
        predictions, test_url = _probe_predictions(run_dir, config)
    else:
        predictions, test_url = _stitched_predictions(run_dir)
    tmp = run_dir / "predictions.partial.npy"
    np.save(tmp, predictions)
    os.replace(tmp, cache)
    (run_dir / "predictions.json").write_text(json.dumps({"test_store": test_url}, indent=2))
    return predictions


def count_scenarios(
    labels: np.ndarray, baseline_a: np.ndarray, baseline_b: np.ndarray, stitched: np.ndarray
) -> dict[str, Any]:
    """Table 12's counts for one stitched model and its two self-stitch baselines.

    All arrays are row-aligned class indices; rows where any is negative are left out.
    """
    arrays = [np.asarray(a, np.int64) for a in (labels, baseline_a, baseline_b, stitched)]
    if len({a.shape for a in arrays}) != 1:
        raise FeatcacheError(
            f"Expected row-aligned labels and predictions. Got shapes {[a.shape for a in arrays]}."
        )
    keep = np.all([a >= 0 for a in arrays], axis=0)
    labels, a, b, s = (x[keep] for x in arrays)
    right = {"a": a == labels, "b": b == labels, "s": s == labels}

    def letters(mask: np.ndarray) -> np.ndarray:
        return np.where(mask, "R", "W")

    patterns = np.char.add(
        np.char.add(letters(right["a"]), letters(right["b"])), letters(right["s"])
    )  # (n,) e.g. "WRR"
    columns = [
        {"pattern": p, "scenario": scenario, "count": int((patterns == p).sum())}
        for p, scenario in SCENARIOS
    ]
    totals = {name: 0 for name in ("preserve", "rescue", "interference")}
    for column in columns:
        totals[column["scenario"]] += column["count"]
    disagree = a != b
    images = int(keep.sum())
    return {
        "columns": columns,
        **totals,
        "all_right": int((patterns == "RRR").sum()),
        "all_wrong": int((patterns == "WWW").sum()),
        "images": images,
        "accuracy": {k: float(v.mean()) if images else float("nan") for k, v in right.items()},
        "disagreements": {
            "images": int(disagree.sum()),
            "follows_a": int((disagree & (s == a)).sum()),
            "follows_b": int((disagree & (s == b)).sum()),
            "neither": int((disagree & (s != a) & (s != b)).sum()),
        },
    }


def _describe(run_dir: Path) -> str:
    config = _run_config(run_dir)
    if "store" in config:
        return f"probe {encoder_label(FeatureStore.open(config['store']).attrs['encoder'])}"
    source = encoder_label(FeatureStore.open(config["source"]).attrs["encoder"])
    target = encoder_label(FeatureStore.open(config["target"]).attrs["encoder"])
    return f"{source}→{target}"


def prediction_analysis(
    stitched_run: str | Path,
    self_a_run: str | Path,
    self_b_run: str | Path,
    *,
    allow_geometry_mismatch: bool = False,
) -> dict[str, Any]:
    """Table 12 for a stitched run and its two self-stitch runs (all classification runs on
    the same test images: ``pairing.check_same_images``, ids and row digests); predictions are
    computed once and cached in each run dir.

    The stitched run's source and target stores must see the same pixels
    (``pairing.check_geometry``) unless ``allow_geometry_mismatch`` or the run was fit with
    it (its config.json records ``allow_geometry_mismatch``)."""
    from stitchtrain.data.pairing import check_geometry, check_same_images

    runs = [Path(stitched_run), Path(self_a_run), Path(self_b_run)]
    stitched = _run_config(runs[0])
    if "source" in stitched and "target" in stitched:
        allowed = allow_geometry_mismatch or stitched.get("allow_geometry_mismatch", False)
        source, target = (
            FeatureStore.open(stitched["source"]),
            FeatureStore.open(stitched["target"]),
        )
        check_same_images(source, target)
        check_geometry(source, target, allow_mismatch=allowed)
    predictions = [run_predictions(run) for run in runs]
    tests = [
        FeatureStore.open(_predictions_test_store(run / "predictions.json"))
        if (run / "predictions.json").is_file()
        else None
        for run in runs
    ]
    if any(t is None for t in tests):
        raise FeatcacheError(
            "Expected the stitched run and both self-stitch runs to be tested on the same images "
            f"(same dataset split, same rows). Got test stores {[t and t.url for t in tests]}."
        )
    for test in tests[1:]:  # the same images in the same rows: ids and row digests
        check_same_images(tests[0], test)
    labels = tests[0].read("labels")
    counts = count_scenarios(labels, predictions[1], predictions[2], predictions[0])
    return {
        "stitched": _describe(runs[0]),
        "baseline_a": _describe(runs[1]),
        "baseline_b": _describe(runs[2]),
        "runs": [str(run) for run in runs],
        **counts,
    }


# -- task-agnostic stitching ----------------------------------------------------------------------
def _check_same_encoder(original_url: str, store: FeatureStore, role: str) -> bool:
    """Refuse a store of another encoder than the run's; False when the run's store is gone."""
    try:
        original = FeatureStore.open(original_url)
    except FeatcacheError:
        return False
    want, got = original.attrs["encoder"], store.attrs["encoder"]
    if want["fingerprint"] != got["fingerprint"]:
        raise FeatcacheError(
            f"The {role} store {store.url} was extracted with {got['name']} (fingerprint "
            f"{got['fingerprint']}), but the run's stitch was trained on {want['name']} "
            f"(fingerprint {want['fingerprint']}, {original_url}). Extract the other dataset "
            "with the same encoder and weights."
        )
    return True


def check_transfer_out(out: Path) -> None:
    """Refuse an output dir that is a file, or a fit run dir (its metrics.json would be
    replaced by the transfer's)."""
    if out.exists() and not out.is_dir():
        raise FeatcacheError(
            f"Expected --out to be a directory (or a new path). Got the file {out} instead."
        )
    if (out / "config.json").is_file():
        raise FeatcacheError(
            f"{out} is a stitchtrain run dir (it has config.json): the transfer's metrics.json "
            "would replace the run's. Use another --out."
        )


def transfer_run(
    run_dir: str | Path,
    source: str,
    target: str,
    out: str | Path,
    *,
    source_test: str | None = None,
    target_test: str | None = None,
    lrs: tuple[float, ...] | None = None,
    epochs: int | None = None,
    patience: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    memory_budget: str | None = None,
) -> dict[str, Any]:
    """Apply a run's FFM stitch to another dataset's (source, target) train stores, fit a
    linear probe on the stitched pooled outputs and return its test accuracy (Table 4).

    Writes ``transfer.json`` (what was done) and ``metrics.json`` under ``out``. Probe
    options default to the run's own (learning rates, epochs, patience, seed).

    Every input is checked before the probe's first step: the output dir (``check_transfer_out``),
    the run (an FFM stitch, a cls task), the stores (found, complete, paired, the run's
    position, the run's encoders by fingerprint), the test stores (found and complete), that
    the stitch fits the stores, the memory budget and the device.
    """
    from stitchtrain.evaluate.evaluation import Distances, evaluation_split, probe_accuracy
    from stitchtrain.pipeline.fit import StitchRecipe
    from stitchtrain.studies.sweep.config import dataset_label
    from stitchtrain.train.config import FitConfig

    run_dir, out = Path(run_dir), Path(out)
    check_transfer_out(out)
    original = FitConfig(**_run_config(run_dir))
    stitch_file = run_dir / "stitch-ffm.safetensors"
    if not stitch_file.is_file():
        raise FeatcacheError(
            f"{run_dir} has no stitch-ffm.safetensors: transfer needs a stitch trained with FFM "
            f"(--objective ffm or ffm+tlt). Got objective {original.objective!r}."
        )
    if original.task != "cls":
        raise FeatcacheError("Transfer is scored by a linear probe: it needs a --task cls run.")
    config = FitConfig(
        source=source,
        target=target,
        position=original.position,
        out=str(out),
        stitch=original.stitch,
        objective="ffm",
        lrs=lrs or original.lrs,
        epochs=epochs or original.epochs,
        patience=patience or original.patience,
        val_fraction=original.val_fraction,
        seed=original.seed if seed is None else seed,
        device=device,
        memory_budget=memory_budget,
        pooled_only=original.pooled_only,
        source_test=source_test,
        target_test=target_test,
        source_weights=original.source_weights,
        target_weights=original.target_weights,
        random_init=original.random_init,
        mlp_hidden=original.mlp_hidden,
        lora_rank=original.lora_rank,
    )
    recipe = StitchRecipe(config)
    checked = [
        _check_same_encoder(original.source, recipe.source, "source"),
        _check_same_encoder(original.target, recipe.target, "target"),
    ]
    try:
        recipe.stitch.load_state_dict(load_file(str(stitch_file)))
    except RuntimeError as err:
        raise FeatcacheError(
            f"The stitch of {run_dir} does not fit the stores {source} -> {target} (different "
            f"widths or token layouts): {err}"
        ) from err
    split = evaluation_split(recipe)  # found and complete, before the probe trains
    test_source, test_target, test_rows = split.source, split.target, split.rows
    distances = Distances(test_target, original.position)  # measured in the scoring pass
    metrics = probe_accuracy(recipe, test_source, test_target, test_rows, distances)
    metrics.update(distances.result())
    trained_store = FeatureStore.open(original.target) if all(checked) else None
    metrics.update(
        {
            "test_images": int(len(test_rows)),
            "run_dir": str(run_dir),
            "source_encoder": encoder_label(recipe.source.attrs["encoder"]),
            "target_encoder": encoder_label(recipe.target.attrs["encoder"]),
            "position": original.position,
            "stitch": original.stitch,
            "dataset": dataset_label(recipe.target.attrs),
            "trained_on": dataset_label(trained_store.attrs) if trained_store else None,
            "encoders_checked": all(checked),
            "test_source": test_source.url,
            "test_target": test_target.url,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    description = {
        "run_dir": str(run_dir),
        "source": source,
        "target": target,
        "source_test": test_source.url,
        "target_test": test_target.url,
        "lrs": list(config.lrs),
        "epochs": config.epochs,
        "patience": config.patience,
        "seed": config.seed,
    }
    (out / "transfer.json").write_text(json.dumps(description, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def read_transfers(root: str | Path) -> list[dict[str, Any]]:
    """The metrics of every ``transfer_run`` output under ``root`` (any depth)."""
    found = []
    for description in sorted(Path(root).rglob("transfer.json")):
        metrics_path = description.parent / "metrics.json"
        if metrics_path.is_file():
            metrics = read_json_object(metrics_path, "transfer metrics", "Run the transfer again.")
            found.append({**metrics, "dir": str(description.parent)})
    return found
