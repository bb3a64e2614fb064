"""Store attributes of a synthetic encoder and dataset, for benchmarks that write random
features straight into stores (no model, no images): what ``FeatureStore.create`` and the
trainers' pairing and geometry checks need to accept them."""

from __future__ import annotations


def synthetic_encoder(name: str, *, depth: int, width: int, grid: int) -> dict:
    """A ``StoreSpec.encoder`` of a ViT/14 with one CLS token on a ``grid`` x ``grid`` patch
    grid, square-squashed input (the geometry every synthetic store shares)."""
    side = 14 * grid
    return {
        "name": name,
        "family": "synthetic",
        "spec": {"library": "none", "model": name, "overrides": {}},
        "depth": depth,
        "width": width,
        "layout": {"prefix": ["cls"], "grid": [grid, grid]},
        "image_size": [side, side],
        "preprocessing": {
            "image_size": [side, side],
            "resize_mode": "squash",
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
        "pooling": "token",
        "pooled_width": width,
        "fingerprint": name,
    }


def synthetic_dataset(images: int) -> dict:
    """A ``StoreSpec.dataset`` of ``images`` unlabelled images (same for every store, so the
    stores pair)."""
    return {
        "source": "synthetic",
        "split": "train",
        "manifest_hash": "synthetic",
        "classes": [],
        "order_seed": 0,
        "num_images": images,
    }
