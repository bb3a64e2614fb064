"""The task head a stitch is trained and scored with: the segmentation head, the classes and
ignored value of a store's masks, and ``--head probe``'s initial head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stitchtrain.model.losses import IGNORE_INDEX, IGNORE_VALUE
from stitchtrain.train.checkpoint import _snapshot

__all__ = ["mask_num_classes", "mask_ignore_value", "fit_probe_head"]


def mask_ignore_value(dataset: dict) -> int | None:
    """The raw "no label" value left in a store's masks: None for a store that records its
    ``mask_labels`` (extraction mapped the ignore value to -1 already), ``IGNORE_VALUE`` (255)
    for a store from before that record, whose masks hold the label maps' raw values."""
    return None if "mask_labels" in dataset else IGNORE_VALUE


def mask_num_classes(dataset: dict, masks) -> int:
    """Segmentation classes of a store (attrs ``dataset``, its ``masks``): the declared
    ``dataset["mask_labels"]["num_classes"]`` (ADE20K: 150), else the largest mask value + 1
    (at least 1), never counting an ignored value (``IGNORE_INDEX``, and ``mask_ignore_value``:
    a 255 does not make 256 classes). ``dataset["classes"]`` are the images' labels, not the
    masks' (demo dataset: 3 shape labels, masks 0 = background .. 3), so they are not used."""
    declared = (dataset.get("mask_labels") or {}).get("num_classes")
    if declared:
        return int(declared)
    ignored = masks == IGNORE_INDEX
    if mask_ignore_value(dataset) is not None:
        ignored |= masks == mask_ignore_value(dataset)
    values = masks[~ignored]
    return int(values.max()) + 1 if values.size else 1


class _SegHead(nn.Module):
    """Linear decoder on patch tokens: ``(B, P + H*W, D)`` final tokens -> ``(B, H*W, C)``."""

    def __init__(self, width: int, num_classes: int, num_prefix: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.linear = nn.Linear(width, num_classes)

    def forward(self, final: torch.Tensor) -> torch.Tensor:
        return self.linear(final[:, self.num_prefix :])


def fit_probe_head(recipe) -> dict[str, Any]:
    """``--head probe``: the TLT head every learning rate starts from, fitted (once: the
    trainer's ``_probe_head`` caches it) on the target store's own outputs over the run's
    train / validation rows with the A.2.2 protocol (``probe.fit_linear_probe`` on pooled
    features for cls, ``probe.fit_linear_decoder`` on final tokens for seg), the run's lr
    grid, epochs, patience, seed and weight decay. Fitted under a forked RNG: the training's random
    stream is the one ``--head fresh`` sees. {"state", "lr", "val_metric", "epochs"}."""
    from stitchtrain.data.integrity import require_finite
    from stitchtrain.scoring.probe import fit_linear_decoder, fit_linear_probe

    config, target = recipe.config, recipe.target
    name, labels = ("pooled", "labels") if config.task == "cls" else ("final", "masks")
    split = {}
    for key, rows in (("train", recipe.train_rows), ("val", recipe.val_rows)):
        values = target.read(name, rows)
        require_finite(target, name, values, rows)
        split[key] = (
            torch.from_numpy(values).to(recipe.device),
            torch.from_numpy(target.read(labels, rows)).long().to(recipe.device),
        )
    protocol = config.grid_protocol()
    devices = [recipe.device] if recipe.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if config.task == "cls":
            result = fit_linear_probe(
                *split["train"], *split["val"], num_classes=recipe.num_classes, **protocol
            )
            metric = result.val_accuracy
        else:
            result = fit_linear_decoder(
                *split["train"],
                *split["val"],
                make_head=recipe._new_head,
                num_classes=recipe.num_classes,
                miou=config.miou,
                ignore_value=recipe.mask_ignore,
                **protocol,
            )
            metric = result.val_miou
    return {
        "state": _snapshot(result.head),
        "lr": result.lr,
        "val_metric": metric,
        "epochs": result.epochs,
    }
