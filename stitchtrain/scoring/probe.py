"""Linear heads trained on fixed features: the linear-probe baseline and the task heads used to
evaluate LFM / FFM stitches (paper A.2.2: "a single linear classifier is trained on pooled image
features while all VFM parameters remain frozen").

Protocol (A.2.2): AdamW (weight decay 0.01, AdamW's default, unless given), a constant learning
rate, up to ``epochs`` epochs, early stopping with ``patience`` on the validation loss, learning
rate chosen from ``lrs`` by validation accuracy, no augmentation. Features are small here
(pooled vectors), so they live in memory as one tensor. ``fit_linear_decoder`` runs the same
protocol for a per-patch linear segmentation decoder (paper A.2.5), chosen by validation mIoU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stitchtrain.model.losses import (
    IGNORE_INDEX,
    classification_loss,
    segmentation_logits,
    segmentation_loss,
    segmentation_targets,
)
from stitchtrain.scoring.metrics import ConfusionMatrix, accuracy

__all__ = [
    "ProbeResult",
    "DecoderResult",
    "fit_linear_probe",
    "fit_linear_decoder",
    "evaluate_probe",
    "evaluate_decoder",
    "probe_store",
]


@dataclass
class ProbeResult:
    head: nn.Linear
    lr: float
    val_accuracy: float
    val_loss: float
    epochs: int
    history: list[dict]


def _batches(count: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(count, generator=generator) if generator is not None else None
    for start in range(0, count, batch_size):
        yield (
            order[start : start + batch_size]
            if order is not None
            else slice(start, start + batch_size)
        )


@torch.no_grad()
def evaluate_probe(
    head: nn.Linear, features: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """(loss, accuracy) of ``head`` on ``(N, D)`` features."""
    logits = head(features)
    return float(classification_loss(logits, labels)), accuracy(logits, labels)


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int,
    lrs: tuple[float, ...] = (1e-3, 5e-3, 1e-2),
    epochs: int = 100,
    patience: int = 5,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.01,
) -> ProbeResult:
    """Train one linear classifier per learning rate; return the best by validation accuracy.

    Features ``(N, D)`` float32, labels ``(N,)`` int64, all on one device.
    """
    best = _fit_head_grid(
        train_features,
        train_labels,
        val_features,
        val_labels,
        make_head=lambda: nn.Linear(train_features.shape[1], num_classes),
        loss_fn=lambda head, x, y: classification_loss(head(x), y),
        evaluate=evaluate_probe,
        lrs=lrs,
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
        seed=seed,
        weight_decay=weight_decay,
    )
    return ProbeResult(
        best.head, best.lr, best.val_metric, best.val_loss, best.epochs, best.history
    )


@dataclass
class DecoderResult:
    """The linear segmentation decoder chosen from the grid, by validation mIoU."""

    head: nn.Module
    lr: float
    val_miou: float
    val_loss: float
    epochs: int
    history: list[dict]


@torch.no_grad()
def evaluate_decoder(
    head: nn.Module,
    features: torch.Tensor,
    masks: torch.Tensor,
    batch_size: int = 128,
    miou: str = "mmseg",
) -> tuple[float, float]:
    """(loss over the labelled pixels, mIoU by definition ``miou``) of a per-patch ``head`` on
    ``(N, T, D)`` tokens against ``(N, h, w)`` class indices (``segmentation_targets``)."""
    confusion, total, pixels = None, 0.0, 0
    for start in range(0, len(features), batch_size):
        truth = masks[start : start + batch_size]
        logits = segmentation_logits(head(features[start : start + batch_size]), truth.shape[-2:])
        labelled = int((truth != IGNORE_INDEX).sum())
        if labelled:
            total += float(segmentation_loss(logits, truth)) * labelled
            pixels += labelled
        confusion = confusion or ConfusionMatrix(logits.shape[1])
        confusion.update(logits.argmax(1), truth)
    return total / max(pixels, 1), confusion.miou(miou) if confusion else float("nan")


def fit_linear_decoder(
    train_features: torch.Tensor,
    train_masks: torch.Tensor,
    val_features: torch.Tensor,
    val_masks: torch.Tensor,
    *,
    make_head,
    num_classes: int,
    lrs: tuple[float, ...] = (1e-3, 5e-3, 1e-2),
    epochs: int = 100,
    patience: int = 5,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.01,
    miou: str = "mmseg",
    ignore_value: int | None = None,
) -> DecoderResult:
    """The classification protocol for a linear segmentation decoder (paper A.2.5: LFM / FFM
    "reuse the optimization and hyperparameter settings described for classification"): one
    decoder ``make_head()`` per learning rate, AdamW, early stopping on the validation loss,
    the best by validation mIoU (definition ``miou``). Tokens ``(N, T, D)``, masks
    ``(N, h, w)`` as stored (``ignore_value``: a raw "no label" value left in them)."""
    train_masks = segmentation_targets(train_masks, num_classes, ignore_value)
    val_masks = segmentation_targets(val_masks, num_classes, ignore_value)
    best = _fit_head_grid(
        train_features,
        train_masks,
        val_features,
        val_masks,
        make_head=make_head,
        loss_fn=lambda head, x, y: segmentation_loss(
            segmentation_logits(head(x), tuple(y.shape[-2:])), y
        ),
        evaluate=lambda head, x, y: evaluate_decoder(head, x, y, miou=miou),
        lrs=lrs,
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
        seed=seed,
        weight_decay=weight_decay,
    )
    return DecoderResult(
        best.head, best.lr, best.val_metric, best.val_loss, best.epochs, best.history
    )


@dataclass
class _GridResult:
    head: nn.Module
    lr: float
    val_metric: float
    val_loss: float
    epochs: int
    history: list[dict]


def _fit_head_grid(
    train_x,
    train_y,
    val_x,
    val_y,
    *,
    make_head,
    loss_fn,
    evaluate,
    lrs,
    epochs,
    patience,
    batch_size,
    seed,
    weight_decay,
) -> _GridResult:
    """The A.2.2 loop shared by probe and decoder: per lr (seeded the same), AdamW, up to
    ``epochs`` epochs of shuffled batches, early stopping on the validation loss; the best
    lr by (validation metric, -validation loss), ties keeping the first."""
    best: _GridResult | None = None
    for lr in lrs:
        torch.manual_seed(seed)
        head = make_head().to(train_x.device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        best_state, best_loss, best_epoch, stale, history = None, float("inf"), 0, 0, []
        for epoch in range(epochs):
            head.train()
            for index in _batches(len(train_x), batch_size, generator):
                loss = loss_fn(head, train_x[index], train_y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            head.eval()
            val_loss, val_metric = evaluate(head, val_x, val_y)
            history.append(
                {"lr": lr, "epoch": epoch + 1, "val_loss": val_loss, "val_accuracy": val_metric}
            )
            if val_loss < best_loss:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
        head.load_state_dict(best_state)
        _, val_metric = evaluate(head, val_x, val_y)
        candidate = _GridResult(head, lr, val_metric, best_loss, best_epoch + 1, history)
        if best is None or (val_metric, -best_loss) > (best.val_metric, -best.val_loss):
            best = candidate
    assert best is not None
    return best


def probe_store(
    store_url: str,
    out: str | Path,
    *,
    test_store: str | None = None,
    lrs: tuple[float, ...] = (1e-3, 5e-3, 1e-2),
    epochs: int = 100,
    patience: int = 5,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Linear probe on a store's pooled features: the encoder's own baseline (Tables 6-11).

    Trains on the store's valid rows (minus a seeded validation split), tests on the matching
    ``test`` split store; writes config.json, head.safetensors, metrics.json under ``out``.
    metrics.json names the encoder as a user reads it (``names.encoder_label``: a hybrid by its
    label); config.json's ``store`` says which store it was.
    """
    from safetensors.torch import save

    from featcache.store import FeatureStore
    from stitchtrain.data.integrity import check_usable, require_finite
    from stitchtrain.data.loader import split_rows
    from stitchtrain.data.names import encoder_label
    from stitchtrain.data.pairing import find_split_store

    store = FeatureStore.open(store_url)
    test = (
        FeatureStore.open(test_store) if test_store else find_split_store(store, "test", ["pooled"])
    )
    # refused before training: unmarked shards, missing or resized objects, non-finite rows
    usable = check_usable(store, ["pooled", "labels", "valid"], allow_incomplete=False).rows
    test_rows = check_usable(test, ["pooled", "labels", "valid"], allow_incomplete=False).rows
    train_rows, val_rows = split_rows(usable, val_fraction, seed)
    pooled = torch.from_numpy(store.read("pooled"))
    require_finite(store, "pooled", pooled.numpy()[usable], usable)
    require_finite(test, "pooled", test.read("pooled")[test_rows], test_rows)
    labels = torch.from_numpy(store.read("labels")).long()
    test_pooled = torch.from_numpy(test.read("pooled"))[test_rows]
    test_labels = torch.from_numpy(test.read("labels")).long()[test_rows]
    result = fit_linear_probe(
        pooled[train_rows],
        labels[train_rows],
        pooled[val_rows],
        labels[val_rows],
        num_classes=max(len(store.attrs["dataset"]["classes"]), 1),
        lrs=lrs,
        epochs=epochs,
        patience=patience,
        seed=seed,
    )
    _, test_accuracy = evaluate_probe(result.head, test_pooled, test_labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "store": store_url,
        "test_store": test.url,
        "lrs": list(lrs),
        "epochs": epochs,
        "patience": patience,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # safetensors' save_file writes mode 0600; bytes written here follow the umask
    (out / "head.safetensors").write_bytes(
        save({k: v.contiguous() for k, v in result.head.state_dict().items()})
    )
    metrics = {
        "encoder": encoder_label(store.attrs["encoder"]),  # a hybrid by its label
        "test_accuracy": test_accuracy,
        "val_accuracy": result.val_accuracy,
        "lr": result.lr,
        "epochs": result.epochs,
        "test_images": int(len(test_rows)),
        "evaluation": "linear_probe",
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
