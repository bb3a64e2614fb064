"""``stitchtrain eval``: test-split metrics of a run dir.

accuracy / mIoU   with the run's trained head when its last stage is TLT; otherwise (LFM,
                  FFM) a linear probe / linear decoder is fitted on the stitched model's
                  frozen outputs over the training rows (paper: FFM is "evaluated via linear
                  probing"): classification with the AdamW / early-stopping / lr-grid
                  protocol of A.2.2 (the run's lrs, epochs, patience, seed, weight decay);
                  the segmentation decoder by ``seg_decoder``: "grid" (default) the same
                  protocol, validation-selected by mIoU (A.2.5: LFM / FFM "reuse the
                  optimization and hyperparameter settings described for classification"),
                  "fixed" min(epochs, 20) epochs at the first learning rate of the grid (the
                  scoring before it was an option). mIoU by the run's ``miou`` definition
                  (``metrics.ConfusionMatrix``), named in the metrics as miou_definition.
layer_distance    mean over test images of the RMS token distance at the stitch position,
                  ||S(R_src^n(x)) - R_tgt^n(x)||_F / sqrt(T)          (Figure 2, circles)
final_distance    the same between stitched and target final tokens  (Figure 2, squares)
pooled_distance   the plain l2 distance between stitched and target pooled outputs
test_interval     n and the 95% interval of the test metric (``scoring.intervals``): Wilson for
                  accuracy, with the chance level and ``below_chance``; a seeded bootstrap
                  over images for mIoU

The test rows are those usable in both test stores (``integrity.usable_rows``): a test store
with unmarked shards is refused unless the run's ``allow_incomplete``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.data.integrity import usable_rows
from stitchtrain.data.loader import Field
from stitchtrain.data.pairing import check_same_images, find_split_store, source_array
from stitchtrain.model.losses import segmentation_logits, segmentation_loss, segmentation_targets
from stitchtrain.scoring.intervals import (
    BOOTSTRAP_RESAMPLES,
    ImageIoU,
    score_interval,
    wilson_interval,
)
from stitchtrain.scoring.metrics import ConfusionMatrix, token_distance
from stitchtrain.scoring.probe import evaluate_probe, fit_linear_decoder, fit_linear_probe
from stitchtrain.scoring.segscore import OriginalMasks
from stitchtrain.train.config import FitConfig
from stitchtrain.train.encoders import load_run_encoder
from stitchtrain.train.rundir import read_json_object
from stitchtrain.train.trainer import StitchTrainer

__all__ = [
    "evaluate_run",
    "load_run",
    "fit_stitched_probe",
    "stitched_pass",
    "test_stores",
    "find_test_stores",
    "EvaluationSplit",
    "evaluation_split",
    "probe_accuracy",
    "Distances",
]


def test_stores(recipe) -> tuple[FeatureStore, FeatureStore]:
    """The run's (source, target) test stores (``find_test_stores``), refused unless they hold
    the same images in the same rows (``pairing.check_same_images``: ids and row digests)."""
    source, target = find_test_stores(recipe)
    check_same_images(source, target)
    return source, target


def find_test_stores(recipe) -> tuple[FeatureStore, FeatureStore]:
    """The run's test stores: as configured (``source_test`` / ``target_test``), else found
    beside its train stores (``pairing.find_split_store``), not yet checked as a pair."""
    config = recipe.config
    source_array_name = source_array(config.stitch, config.position)
    source = (
        FeatureStore.open(config.source_test)
        if config.source_test
        else find_split_store(recipe.source, "test", [source_array_name])
    )
    target = (
        FeatureStore.open(config.target_test)
        if config.target_test
        else find_split_store(recipe.target, "test", ["pooled"])
    )
    return source, target


@dataclass(frozen=True)
class EvaluationSplit:
    """The test stores of a run, the rows evaluation reads, and notes on incomplete stores."""

    source: FeatureStore
    target: FeatureStore
    rows: np.ndarray
    incomplete: dict[str, dict]  # url -> integrity.StoreRows.note


def evaluation_split(recipe) -> EvaluationSplit:
    """Find (or open) the test stores and check them for every array evaluation reads."""
    config = recipe.config
    source, target = test_stores(recipe)
    labels = "labels" if config.task == "cls" else "masks"
    wanted = ("pooled", "final", f"layers/{config.position}", labels)
    reads = [
        (source, [source_array(config.stitch, config.position)]),
        (target, [name for name in wanted if name in target.group]),
    ]
    rows, incomplete = usable_rows(reads, config.allow_incomplete)
    return EvaluationSplit(source, target, rows, incomplete)


@torch.no_grad()
def stitched_pass(recipe, source: FeatureStore, target: FeatureStore, rows, extra: list[Field]):
    """Yield (batch, stitched final, stitched pooled) over ``rows`` in order; ``batch["rows"]``
    holds each batch's store rows."""
    config = recipe.config
    fields = [Field("source", source, source_array(config.stitch, config.position)), *extra]
    loader = recipe._loader(fields, rows, 128, shuffle=False, return_rows=True)
    recipe.stitch.eval()
    for batch in loader.epoch(0):
        with recipe.autocast:
            final, pooled = recipe.stitched_outputs(batch["source"])
        yield batch, final.float(), pooled.float()


def stitched_outputs_in_memory(
    recipe, source, target, rows, name: str, distances: Distances | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stitched pooled (cls) or final (seg) outputs with labels/masks, all rows in memory;
    ``distances`` accumulates the feature distances in the same pass."""
    labels_array = "labels" if recipe.config.task == "cls" else "masks"
    extra = [Field("labels", target, labels_array), *(distances.fields if distances else [])]
    features, labels = [], []
    for batch, final, pooled in stitched_pass(recipe, source, target, rows, extra):
        if distances is not None:
            distances.update(recipe, batch, final, pooled)
        features.append(pooled if name == "pooled" else final)
        labels.append(batch["labels"].long())
    return torch.cat(features), torch.cat(labels)


def fit_stitched_probe(recipe):
    """The linear probe on the stitched model's pooled outputs over the run's training rows,
    validation-selected from the run's lr grid (seeded: the same head every time)."""
    config = recipe.config
    train_x, train_y = stitched_outputs_in_memory(
        recipe, recipe.source, recipe.target, recipe.train_rows, "pooled"
    )
    val_x, val_y = stitched_outputs_in_memory(
        recipe, recipe.source, recipe.target, recipe.val_rows, "pooled"
    )
    return fit_linear_probe(
        train_x,
        train_y,
        val_x,
        val_y,
        num_classes=recipe.num_classes,
        **config.grid_protocol(),
    )


def probe_accuracy(
    recipe, test_source, test_target, test_rows, distances: Distances | None = None
) -> dict[str, Any]:
    probe = fit_stitched_probe(recipe)
    test_x, test_y = stitched_outputs_in_memory(
        recipe, test_source, test_target, test_rows, "pooled", distances
    )
    _, test_accuracy = evaluate_probe(probe.head, test_x, test_y)
    return {
        "test_accuracy": test_accuracy,
        "evaluation": "linear_probe",
        "probe_lr": probe.lr,
        "test_interval": _accuracy_interval(
            round(test_accuracy * len(test_y)), len(test_y), recipe.num_classes
        ),
    }


def _accuracy_interval(correct: int, count: int, classes: int) -> dict[str, Any]:
    """``test_interval`` of ``correct`` of ``count`` test images (Wilson)."""
    low, high = wilson_interval(correct, count)
    return score_interval(
        "test_accuracy", count, low, high, "wilson", classes=classes, correct=correct
    )


def _seg_decoder_miou(recipe, test_source, test_target, test_rows, distances) -> dict[str, Any]:
    """Fit the linear decoder on frozen stitched final tokens (``seg_decoder``: "grid" or
    "fixed", module docstring), then test mIoU."""
    config = recipe.config
    train_x, train_y = stitched_outputs_in_memory(
        recipe, recipe.source, recipe.target, recipe.train_rows, "final"
    )
    train_y = segmentation_targets(train_y, recipe.num_classes, recipe.mask_ignore)
    if config.seg_decoder == "grid":
        val_x, val_y = stitched_outputs_in_memory(
            recipe, recipe.source, recipe.target, recipe.val_rows, "final"
        )
        decoder = fit_linear_decoder(
            train_x,
            train_y,
            val_x,
            val_y,
            make_head=recipe._new_head,
            num_classes=recipe.num_classes,
            miou=config.miou,
            **config.grid_protocol(),
            ignore_value=recipe.mask_ignore,
        )
        head, decoder_lr = decoder.head, decoder.lr
    else:
        head, decoder_lr = recipe._new_head(), config.lrs[0]
        optimizer = torch.optim.AdamW(
            head.parameters(), lr=decoder_lr, weight_decay=config.weight_decay
        )
        generator = torch.Generator().manual_seed(config.seed)
        for _ in range(min(config.epochs, 20)):
            for index in torch.randperm(len(train_x), generator=generator).split(128):
                pixels = segmentation_logits(head(train_x[index]), tuple(train_y.shape[-2:]))
                loss = segmentation_loss(pixels, train_y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    recipe.head = head
    return {
        **_head_metric(recipe, test_source, test_target, test_rows, distances),
        "evaluation": "linear_decoder",
        "decoder_lr": decoder_lr,
    }


@torch.no_grad()
def _head_metric(
    recipe, test_source, test_target, test_rows, distances: Distances | None = None
) -> dict[str, Any]:
    task = recipe.config.task
    labels_array = "labels" if task == "cls" else "masks"
    correct, count = 0, 0
    confusion = ConfusionMatrix(recipe.num_classes)
    images = ImageIoU(confusion)  # per-image counts for the interval; fills ``confusion``
    original = (
        OriginalMasks(test_target)
        if task == "seg" and recipe.config.score_resolution == "original"
        else None
    )
    recipe.head.eval()
    extra = [Field("labels", test_target, labels_array), *(distances.fields if distances else [])]
    for batch, final, pooled in stitched_pass(recipe, test_source, test_target, test_rows, extra):
        if distances is not None:
            distances.update(recipe, batch, final, pooled)
        labels = batch["labels"].long()
        if task == "cls":
            correct += int((recipe.head(pooled).argmax(-1) == labels).sum())
            count += len(labels)
        elif original is not None:
            original.score(images, recipe.head(final), batch["rows"].cpu().numpy())
        else:
            pixels = segmentation_logits(recipe.head(final), tuple(labels.shape[-2:]))
            truth = segmentation_targets(labels, recipe.num_classes, recipe.mask_ignore)
            for predicted, image_truth in zip(pixels.argmax(1), truth, strict=True):
                images.update(predicted, image_truth)
    if task == "cls":
        return {
            "test_accuracy": correct / max(count, 1),
            "evaluation": "head",
            "test_interval": _accuracy_interval(correct, count, recipe.num_classes),
        }
    definition = recipe.config.miou
    low, high = images.interval(definition, recipe.config.seed)
    method = f"bootstrap over images ({BOOTSTRAP_RESAMPLES} resamples, seed {recipe.config.seed})"
    return {
        "test_miou": confusion.miou(definition),
        "test_interval": score_interval("test_miou", len(images.counts), low, high, method),
        "miou_definition": definition,
        "test_pixel_accuracy": confusion.pixel_accuracy(),
        "score_resolution": recipe.config.score_resolution,
        **({"scored_pixel_fraction": original.scored_fraction} if original else {}),
        "evaluation": "head",
    }


class Distances:
    """Running sums of the feature distances (module docstring) over stitched test batches,
    so the pass that scores the test split also measures them (one forward, not two). The
    batches must carry ``fields`` (the target's pooled, final and layer-n arrays it has)."""

    def __init__(self, test_target: FeatureStore, position: int) -> None:
        self.fields = [Field("pooled", test_target, "pooled")]
        self.has_final = "final" in test_target.group
        self.has_layer = f"layers/{position}" in test_target.group
        if self.has_final:
            self.fields.append(Field("final", test_target, "final"))
        if self.has_layer:
            self.fields.append(Field("layer", test_target, f"layers/{position}"))
        self.sums = {"layer_distance": 0.0, "final_distance": 0.0, "pooled_distance": 0.0}
        self.count = 0

    @torch.no_grad()
    def update(self, recipe, batch, final: torch.Tensor, pooled: torch.Tensor) -> None:
        self.count += len(pooled)
        self.sums["pooled_distance"] += float(token_distance(pooled, batch["pooled"]).sum())
        if self.has_final:
            self.sums["final_distance"] += float(token_distance(final, batch["final"]).sum())
        if self.has_layer:
            stitched = recipe.stitch(batch["source"]).float()
            self.sums["layer_distance"] += float(token_distance(stitched, batch["layer"]).sum())

    def result(self) -> dict[str, float]:
        result = {key: value / max(self.count, 1) for key, value in self.sums.items()}
        if not self.has_final:
            result.pop("final_distance")
        if not self.has_layer:
            result.pop("layer_distance")
        return result


@torch.no_grad()
def load_run(run_dir: str | Path, **overrides):
    """A finished run's ``StitchTrainer`` with its trained stitch (and head) and the target
    encoder loaded; ``overrides`` replace config fields (e.g. other test stores)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FeatcacheError(f"No config.json in {run_dir}: not a stitchtrain run dir.")
    if not (run_dir / "stitch.safetensors").is_file():
        raise FeatcacheError(f"{run_dir} has no stitch.safetensors: the run has not finished.")
    config = read_json_object(
        run_dir / "config.json", "a run's config (a JSON object)", "Is it a stitchtrain run dir?"
    )
    recipe = StitchTrainer(FitConfig(**{**config, **overrides}))
    recipe.stitch.load_state_dict(load_file(str(run_dir / "stitch.safetensors")))
    if (run_dir / "head.safetensors").is_file():
        recipe.head.load_state_dict(load_file(str(run_dir / "head.safetensors")))
    if recipe.target_encoder is None:
        recipe.target_encoder = load_run_encoder(
            recipe.target, recipe.config.target_weights, recipe.config.random_init, recipe.device
        )
    return recipe


def evaluate_run(run_dir: str | Path, recipe=None, split: EvaluationSplit | None = None) -> dict:
    """Test metrics of a finished run (``recipe`` reuses a live one; else rebuilt from disk;
    ``split``: its checked ``evaluation_split``, else found and checked here)."""
    if recipe is None:
        recipe = load_run(run_dir)
    if recipe.target_encoder is None:
        recipe.target_encoder = load_run_encoder(
            recipe.target, recipe.config.target_weights, recipe.config.random_init, recipe.device
        )
    split = split or evaluation_split(recipe)
    test_source, test_target, test_rows = split.source, split.target, split.rows
    distances = Distances(test_target, recipe.config.position)  # in the scoring pass
    if recipe.stages[-1] == "tlt":
        metrics = _head_metric(recipe, test_source, test_target, test_rows, distances)
    elif recipe.config.task == "cls":
        metrics = probe_accuracy(recipe, test_source, test_target, test_rows, distances)
    else:
        metrics = _seg_decoder_miou(recipe, test_source, test_target, test_rows, distances)
    metrics.update(distances.result())
    metrics["test_images"] = int(len(test_rows))
    metrics["test_source"], metrics["test_target"] = test_source.url, test_target.url
    if split.incomplete:
        metrics["incomplete_stores"] = dict(split.incomplete)
    return metrics
