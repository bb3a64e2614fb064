"""The built-in end-to-end demo: the paper's Table 1 protocol at toy scale.

  1. generate the shapes dataset and extract two tiny encoders of different families
     (DINOv2 and SigLIP2 architectures) for the train and test splits
  2. linear probe of each encoder (the baselines)
  3. at two stitch positions, in both directions: LFM, FFM and FFM+TLT with an MLP stitch
  4. self-stitch (FFM+TLT) of each encoder at the same positions (paper section 4.1)

A cross-model FFM+TLT fit takes its FFM stage from the FFM fit of the same pair and position
(``stitchtrain.train.stages``' shared stages: the same computation, trained once).

One learning rate and few epochs keep it under a few minutes on two CPU cores; the numbers
are toy numbers (random-init encoders), the protocol is the real one.

Progress: ``on_step(kind, name, index, total)`` as each of the ``total`` steps starts (kind
"extract", "probe" or "fit"; a callable it returns gets that fit's progress events, see
``stitchtrain.pipeline.fit.StitchRecipe.run``), ``log(line)`` as each ends, with its result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from featcache.demo_data import DEMO_MODELS, demo_extract_configs
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from stitchtrain.pipeline.fit import fit
from stitchtrain.scoring.probe import probe_store
from stitchtrain.train.config import FitConfig

__all__ = ["DemoResult", "run_demo", "DEMO_MODELS", "DEMO_POSITIONS"]

DEMO_POSITIONS = (2, 4)  # of the stored DEMO_LAYERS
DEMO_OBJECTIVES = ("lfm", "ffm", "ffm+tlt")

StepFn = Callable[[str, str, int, int], Callable[[dict], None] | None]


@dataclass
class DemoResult:
    """Accuracies keyed like the paper's tables."""

    probes: dict[str, float] = field(default_factory=dict)  # encoder -> accuracy
    stitched: dict[tuple[str, str, str, int], float] = field(default_factory=dict)
    # (source, target, objective, position) -> test accuracy; self-stitch has source == target
    test_images: int = 0  # test images each accuracy is computed on (the fewest of any cell)


def _extract(config: ExtractConfig) -> list[str]:
    """Fill the stores of ``config``; their URLs, in ``DEMO_MODELS`` order."""
    plan = plan_extraction(config)
    run_extraction(plan)
    return list(plan.urls)


def run_demo(
    out: Path,
    *,
    epochs: int = 8,
    lr: float = 5e-3,
    log: Callable[[str], None] = print,
    on_step: StepFn | None = None,
    extract: Callable[[ExtractConfig], list[str]] = _extract,
) -> DemoResult:
    """Run the demo under ``out`` (data/, stores/, runs/); ``extract`` fills one split's
    stores and returns their URLs (default: plan and run the extraction, silently)."""
    configs = demo_extract_configs(out)
    pairs = [(s, t, o) for s in DEMO_MODELS for t in DEMO_MODELS if s != t for o in DEMO_OBJECTIVES]
    pairs += [(m, m, "ffm+tlt") for m in DEMO_MODELS]
    runs = [(*pair, position) for pair in pairs for position in DEMO_POSITIONS]
    total = len(configs) + len(DEMO_MODELS) + len(runs)
    index = 0

    def start(kind: str, name: str) -> Callable[[dict], None] | None:
        nonlocal index
        index += 1
        return None if on_step is None else on_step(kind, name, index - 1, total)

    stores: dict[tuple[str, str], str] = {}
    for config in configs:
        start("extract", f"extract {config.split}")
        urls = extract(config)
        for model, url in zip(DEMO_MODELS, urls, strict=True):
            stores[model, config.split] = url
        log(f"extracted {config.split}: {', '.join(urls)}")
    result = DemoResult()
    counts = []
    for model in DEMO_MODELS:
        start("probe", f"linear probe {model}")
        metrics = probe_store(
            stores[model, "train"],
            out / "runs" / f"probe-{model}",
            test_store=stores[model, "test"],
            lrs=(lr,),
            epochs=100,
        )
        result.probes[model] = metrics["test_accuracy"]
        counts.append(metrics["test_images"])
        log(f"linear probe {model}: {metrics['test_accuracy']:.3f}")
    done: list[str] = []  # run dirs so far: an FFM stage of ffm+tlt is the one ffm trained
    for source, target, objective, position in runs:
        what = f"{source} -> {target} {objective} at {position}"
        fit_progress = start("fit", what)
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
        metrics = fit(config, fit_progress, reuse=done)
        done.append(config.out)
        result.stitched[source, target, objective, position] = metrics["test_accuracy"]
        counts.append(metrics["test_images"])
        log(f"{what}: {metrics['test_accuracy']:.3f}")
    result.test_images = min(counts)
    return result
