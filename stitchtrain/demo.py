"""The built-in end-to-end demo: the paper's Table 1 protocol at toy scale.

  1. generate the shapes dataset and extract two tiny encoders of different families
     (DINOv2 and SigLIP2 architectures) for the train and test splits
  2. linear probe of each encoder (the baselines)
  3. at two stitch positions, in both directions: LFM, FFM and FFM+TLT with an MLP stitch
  4. self-stitch (FFM+TLT) of each encoder at the same positions (paper section 4.1)

One learning rate and few epochs keep it under a few minutes on two CPU cores; the numbers
are toy numbers (random-init encoders), the protocol is the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from featcache.demo_data import DEMO_MODELS, demo_extract_configs
from featcache.extract import plan_extraction, run_extraction
from stitchtrain.fit import FitConfig, fit
from stitchtrain.probe import probe_store

__all__ = ["DemoResult", "run_demo", "DEMO_MODELS", "DEMO_POSITIONS"]

DEMO_POSITIONS = (2, 4)  # of the stored DEMO_LAYERS
DEMO_OBJECTIVES = ("lfm", "ffm", "ffm+tlt")


@dataclass
class DemoResult:
    """Accuracies keyed like the paper's tables."""

    probes: dict[str, float] = field(default_factory=dict)  # encoder -> accuracy
    stitched: dict[tuple[str, str, str, int], float] = field(default_factory=dict)
    # (source, target, objective, position) -> test accuracy; self-stitch has source == target


def run_demo(
    out: Path, *, epochs: int = 8, lr: float = 5e-3, log: Callable[[str], None] = print
) -> DemoResult:
    stores: dict[tuple[str, str], str] = {}
    for config in demo_extract_configs(out):
        plan = plan_extraction(config)
        run_extraction(plan)
        for model, url in zip(DEMO_MODELS, plan.urls, strict=True):
            stores[model, config.split] = url
        log(f"extracted {config.split}: {', '.join(plan.urls)}")
    result = DemoResult()
    for model in DEMO_MODELS:
        metrics = probe_store(
            stores[model, "train"],
            out / "runs" / f"probe-{model}",
            test_store=stores[model, "test"],
            lrs=(lr,),
            epochs=100,
        )
        result.probes[model] = metrics["test_accuracy"]
        log(f"linear probe {model}: {metrics['test_accuracy']:.3f}")
    pairs = [(s, t, o) for s in DEMO_MODELS for t in DEMO_MODELS if s != t for o in DEMO_OBJECTIVES]
    pairs += [(m, m, "ffm+tlt") for m in DEMO_MODELS]
    for source, target, objective in pairs:
        for position in DEMO_POSITIONS:
            name = f"{source}-to-{target}-{objective.replace('+', '-')}-{position}"
            config = FitConfig(
                source=stores[source, "train"],
                target=stores[target, "train"],
                source_test=stores[source, "test"],
                target_test=stores[target, "test"],
                position=position,
                out=str(out / "runs" / name),
                stitch="mlp",
                objective=objective,
                lrs=(lr,),
                epochs=epochs,
                patience=3,
            )
            metrics = fit(config)
            result.stitched[source, target, objective, position] = metrics["test_accuracy"]
            log(f"{source} -> {target} {objective} at {position}: {metrics['test_accuracy']:.3f}")
    return result
