"""Linear heads trained on fixed features: the linear-probe baseline and the task heads used to
evaluate LFM / FFM stitches (paper A.2.2: "a single linear classifier is trained on pooled image
features while all VFM parameters remain frozen").

Protocol (A.2.2): AdamW, up to ``epochs`` epochs, early stopping with ``patience`` on the
validation loss, learning rate chosen from ``lrs`` by validation accuracy, no augmentation.
Features are small here (pooled vectors), so they live in memory as one tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stitchtrain.losses import classification_loss
from stitchtrain.metrics import accuracy

__all__ = ["ProbeResult", "fit_linear_probe", "evaluate_probe", "probe_store"]


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
) -> ProbeResult:
    """Train one linear classifier per learning rate; return the best by validation accuracy.

    Features ``(N, D)`` float32, labels ``(N,)`` int64, all on one device.
    """
    best: ProbeResult | None = None
    for lr in lrs:
        torch.manual_seed(seed)
        head = nn.Linear(train_features.shape[1], num_classes).to(train_features.device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        best_state, best_loss, best_epoch, stale, history = None, float("inf"), 0, 0, []
        for epoch in range(epochs):
            head.train()
            for index in _batches(len(train_features), batch_size, generator):
                loss = classification_loss(head(train_features[index]), train_labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            head.eval()
            val_loss, val_accuracy = evaluate_probe(head, val_features, val_labels)
            history.append(
                {"lr": lr, "epoch": epoch, "val_loss": val_loss, "val_accuracy": val_accuracy}
            )
            if val_loss < best_loss:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
        head.load_state_dict(best_state)
        _, val_accuracy = evaluate_probe(head, val_features, val_labels)
        candidate = ProbeResult(head, lr, val_accuracy, best_loss, best_epoch + 1, history)
        if best is None or (val_accuracy, -best_loss) > (best.val_accuracy, -best.val_loss):
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
    """
    from safetensors.torch import save_file

    from featcache.store import FeatureStore
    from stitchtrain.integrity import check_usable, require_finite
    from stitchtrain.loader import split_rows
    from stitchtrain.pairing import find_split_store

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
    save_file(
        {k: v.contiguous() for k, v in result.head.state_dict().items()},
        str(out / "head.safetensors"),
    )
    metrics = {
        "encoder": store.attrs["encoder"]["name"],
        "test_accuracy": test_accuracy,
        "val_accuracy": result.val_accuracy,
        "lr": result.lr,
        "epochs": result.epochs,
        "test_images": int(len(test_rows)),
        "evaluation": "linear_probe",
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
