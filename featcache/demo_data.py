"""A small built-in image dataset, generated: shapes on textured backgrounds.

Class k draws shape k (disc, square, triangle, horizontal bars, ring, cross) in a jittered
class hue at a random position and size on a random smooth background: learnable from colour
and shape, so even random-init toy encoders give features a linear probe can use, while the
shape still matters for the segmentation masks. Each image has a PNG label map (0 = background,
k + 1 = shape of class k) for the segmentation task. Deterministic for a given seed.

Layout written by ``make_demo_dataset(root)``:
  root/images/<class name>/<class name>_<i>.png     one folder per class (sorted = label order)
  root/masks/<class name>/<class name>_<i>.png
  root/manifest.csv                                  path,label,split,mask  (paths relative)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASS_NAMES",
    "DEMO_LAYERS",
    "DEMO_MODELS",
    "demo_extract_configs",
    "make_demo_dataset",
]

CLASS_NAMES = ("disc", "square", "triangle", "bars", "ring", "cross")
_CLASS_COLOURS = (
    (220, 40, 40),
    (40, 200, 60),
    (50, 70, 230),
    (230, 210, 40),
    (200, 50, 210),
    (40, 210, 220),
)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = x1 - x0, y1 - y0
    if kind == "disc":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "bars":
        for i in range(3):
            top = y0 + i * h / 3
            draw.rectangle((x0, top, x1, top + h / 6), fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(w / 6)))
    elif kind == "cross":
        draw.rectangle((cx - w / 8, y0, cx + w / 8, y1), fill=fill)
        draw.rectangle((x0, cy - h / 8, x1, cy + h / 8), fill=fill)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def make_demo_dataset(
    root: str | Path,
    *,
    num_classes: int = 4,
    per_class: int = 40,
    test_fraction: float = 0.25,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root`` (idempotent: same arguments give the same bytes).

    Returns the path of ``manifest.csv``. ``split`` is "train" or "test" per image.
    """
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"Expected 1 <= num_classes <= {len(CLASS_NAMES)}. Got {num_classes}.")
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for label, name in enumerate(CLASS_NAMES[:num_classes]):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray(_background(rng, size))
            mask = Image.new("L", (size, size), 0)
            extent = rng.uniform(0.35, 0.7) * size
            x0, y0 = rng.uniform(0, size - extent, size=2)
            box = (x0, y0, x0 + extent, y0 + extent)
            jitter = rng.integers(-35, 36, size=3)
            colour = tuple(
                int(np.clip(c + j, 0, 255))
                for c, j in zip(_CLASS_COLOURS[label], jitter, strict=True)
            )
            _draw_shape(ImageDraw.Draw(image), name, box, colour)
            _draw_shape(ImageDraw.Draw(mask), name, box, label + 1)
            stem = f"{name}_{i:04d}.png"
            image.save(root / "images" / name / stem)
            mask.save(root / "masks" / name / stem)
            split = "test" if i < round(per_class * test_fraction) else "train"
            rows.append((f"images/{name}/{stem}", name, split, f"masks/{name}/{stem}"))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "mask"])
        writer.writerows(rows)
    return manifest


DEMO_MODELS = ("dinov2-tiny", "siglip2-tiny")  # two families: ViT with CLS, ViT with MAP pool
DEMO_LAYERS = (2, 4, 6)


def demo_extract_configs(out: str | Path) -> list:
    """The demos' extraction of ``DEMO_MODELS``: dataset under ``out/data`` (written here),
    stores under ``out/stores``; one ``ExtractConfig`` per split (train, test). Both
    ``featcache demo`` and ``stitchtrain demo`` use it, so one reuses the other's stores."""
    from featcache.extract import ExtractConfig

    out = Path(out)
    manifest = make_demo_dataset(out / "data")
    return [
        ExtractConfig(
            models=list(DEMO_MODELS),
            data=str(manifest),
            out=str(out / "stores"),
            layers=list(DEMO_LAYERS),
            split=split,
            shard_size=64,
            batch_size=32,
        )
        for split in ("train", "test")
    ]
