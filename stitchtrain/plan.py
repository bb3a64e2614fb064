"""``stitchtrain fit --dry-run``: what a fit would do, after every check fit makes, no training.

``plan_fit(config)`` runs fit's setup (``StitchRecipe``: stores opened and checked, pairing,
geometry, position, encoder fingerprints; the test stores found and checked; the run dir's
state) and builds the loaders training and evaluation would use, which decide staged or
streamed from the memory budget without reading any data. Nothing is written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stitchtrain.fit import FitConfig, StitchRecipe, check_run_dir
from stitchtrain.loader import FeatureLoader, Field, _default_budget, parse_size
from stitchtrain.pairing import source_array

__all__ = ["FitPlan", "plan_fit"]


@dataclass
class FitPlan:
    """The plan of one fit (JSON-able through ``to_dict``)."""

    out: str
    run_dir: str  # fresh | started | resumable | finished (fit.check_run_dir)
    device: str
    stages: list[str]
    lrs: list[float]
    epochs: int
    patience: int
    batch_size: dict[str, int]  # per stage
    train_rows: int
    val_rows: int
    test_rows: int
    memory_budget: int  # bytes, per loader (the given --memory-budget or the default)
    # "<stage>/train", "<stage>/val", "test": {"mode": staged|streamed, "rows", "bytes"}
    loaders: dict[str, dict[str, Any]] = field(default_factory=dict)
    staged_bytes: int = 0  # held in memory by the staged loaders together
    model_bytes: int = 0  # stitch, head and the frozen encoders' parameters
    steps_per_epoch: dict[str, int] = field(default_factory=dict)
    # at most (early stopping may end sooner): epochs x steps per epoch x lrs, over the stages;
    # 0 for a finished run dir (fit returns its metrics at once)
    max_steps: int = 0
    incomplete_stores: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(name, value) lines for a table."""
        lines = [
            ("run dir", f"{self.out} ({self.run_dir})"),
            ("device", self.device),
            ("stages", " -> ".join(self.stages)),
            ("lr grid", ", ".join(f"{lr:g}" for lr in self.lrs)),
            ("epochs / patience", f"{self.epochs} / {self.patience}"),
            ("batch size", ", ".join(f"{s} {b}" for s, b in self.batch_size.items())),
            ("rows train / val / test", f"{self.train_rows} / {self.val_rows} / {self.test_rows}"),
            ("memory budget", _size(self.memory_budget)),
        ]
        for name, loader in self.loaders.items():
            lines.append(
                (
                    f"loader {name}",
                    f"{loader['mode']}, {loader['rows']} rows, {_size(loader['bytes'])}",
                )
            )
        lines += [
            ("staged memory", _size(self.staged_bytes)),
            ("model parameters", _size(self.model_bytes)),
            ("steps per epoch", ", ".join(f"{s} {n}" for s, n in self.steps_per_epoch.items())),
            ("max optimiser steps", str(self.max_steps)),
        ]
        if self.incomplete_stores:
            lines.append(("incomplete stores", ", ".join(self.incomplete_stores)))
        return lines


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _loader_entry(loader: FeatureLoader) -> dict[str, Any]:
    return {
        "mode": "staged" if loader.staged else "streamed",
        "rows": len(loader.rows),
        "bytes": int(loader.nbytes),
    }


def _parameter_bytes(*modules) -> int:
    return sum(
        p.numel() * p.element_size()
        for module in modules
        if module is not None
        for p in module.parameters()
    )


def plan_fit(config: FitConfig) -> FitPlan:
    """Check every input of ``fit(config)`` as fit does before its first step and return its
    plan; raises fit's errors. Writes nothing (the run dir is not created)."""
    from stitchtrain.evaluate import evaluation_split

    state = check_run_dir(Path(config.out), config)
    recipe = StitchRecipe(config)
    split = evaluation_split(recipe)
    loaders = {}
    for stage in recipe.stages:
        for part in ("train", "val"):
            loaders[f"{stage}/{part}"] = recipe._stage_loader(stage, part)
    labels = "labels" if config.task == "cls" else "masks"
    source_name = source_array(config.stitch, config.position)
    loaders["test"] = recipe._loader(
        [Field("source", split.source, source_name), Field("labels", split.target, labels)],
        split.rows,
        128,
        shuffle=False,
    )
    entries = {name: _loader_entry(loader) for name, loader in loaders.items()}
    steps = {
        stage: math.ceil(len(recipe.train_rows) / config.stage_batch_size(stage))
        for stage in recipe.stages
    }
    budget = (
        parse_size(config.memory_budget)
        if config.memory_budget is not None
        else _default_budget(recipe.device)
    )
    encoders = [getattr(e, "module", None) for e in (recipe.target_encoder, recipe.source_encoder)]
    max_steps = sum(config.epochs * n * len(config.lrs) for n in steps.values())
    return FitPlan(
        out=str(config.out),
        run_dir=state,
        device=str(recipe.device),
        stages=list(recipe.stages),
        lrs=list(config.lrs),
        epochs=config.epochs,
        patience=config.patience,
        batch_size={stage: config.stage_batch_size(stage) for stage in recipe.stages},
        train_rows=len(recipe.train_rows),
        val_rows=len(recipe.val_rows),
        test_rows=len(split.rows),
        memory_budget=int(budget),
        loaders=entries,
        staged_bytes=sum(e["bytes"] for e in entries.values() if e["mode"] == "staged"),
        model_bytes=_parameter_bytes(recipe.stitch, recipe.head, *encoders),
        steps_per_epoch=steps,
        max_steps=0 if state == "finished" else max_steps,
        incomplete_stores=sorted({**recipe.incomplete, **split.incomplete}),
    )
