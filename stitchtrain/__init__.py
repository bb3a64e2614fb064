"""stitchtrain: train and evaluate stitch layers between frozen vision models from featcache stores.

The public API, imported on first access (``featcache``'s pattern), so ``import stitchtrain``
stays cheap and the CLI's ``--help`` never loads torch:

    fit, StitchRecipe, FitConfig     a fit: train, evaluate, save (``pipeline.fit``,
                                     ``train.config``)
    FitStopped, NonFiniteLossError   its errors beyond featcache's (``train.config``)
    plan_fit, FitPlan                ``fit --dry-run`` (``pipeline.plan``)
    evaluate_run, load_run           a finished run's test metrics, its trained StitchTrainer
                                     (``evaluate.evaluation``)
    probe_store                      the linear-probe baseline of a store (``scoring.probe``)

The packages, top to bottom (each imports only those below it): ``studies`` | ``tree`` ->
``pipeline`` -> ``evaluate`` -> ``train`` -> ``scoring`` -> ``model`` | ``data``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stitchtrain.evaluate.evaluation import evaluate_run, load_run
    from stitchtrain.pipeline.fit import StitchRecipe, fit
    from stitchtrain.pipeline.plan import FitPlan, plan_fit
    from stitchtrain.scoring.probe import probe_store
    from stitchtrain.train.config import FitConfig, FitStopped, NonFiniteLossError

# Attribute -> the module it is imported from on first access (those modules import torch).
_LAZY = {
    "fit": "stitchtrain.pipeline.fit",
    "StitchRecipe": "stitchtrain.pipeline.fit",
    "FitConfig": "stitchtrain.train.config",
    "FitStopped": "stitchtrain.train.config",
    "NonFiniteLossError": "stitchtrain.train.config",
    "plan_fit": "stitchtrain.pipeline.plan",
    "FitPlan": "stitchtrain.pipeline.plan",
    "evaluate_run": "stitchtrain.evaluate.evaluation",
    "load_run": "stitchtrain.evaluate.evaluation",
    "probe_store": "stitchtrain.scoring.probe",
}

__all__ = [
    "fit",
    "StitchRecipe",
    "FitConfig",
    "FitStopped",
    "NonFiniteLossError",
    "plan_fit",
    "FitPlan",
    "evaluate_run",
    "load_run",
    "probe_store",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stitchtrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
