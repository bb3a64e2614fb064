"""Generated JPEG datasets for the benchmarks: photo-sized, photo-like (smooth colour fields
with a little texture: ~45 KB at 500 x 375 and quality 90, in ImageNet's range), seeded.

Only ``unique`` distinct pictures are drawn (drawing costs ~0.1 s each); the other files
repeat their bytes, which costs decoding exactly as much (each file is read and decoded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_jpeg_folder(
    root: str | Path, images: int, *, size: tuple[int, int] = (500, 375), classes: int = 4,
    quality: int = 90, seed: int = 0, unique: int = 32,
) -> Path:  # fmt: skip
    """``root/<class k>/<i>.jpg`` for ``images`` images of ``size`` (w, h); returns ``root``
    (an image folder ``featcache extract --data`` reads). Equal arguments give equal bytes."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    drawn: list[bytes] = []
    for i in range(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        if len(drawn) == unique:
            path.write_bytes(drawn[i % unique])
            continue
        fx, fy, phase = rng.uniform(0.002, 0.03, 3)
        base = rng.uniform(40, 215, 3)
        field = np.stack(
            [b + 40 * np.sin(fx * x * (c + 1) + fy * y + phase * 50) for c, b in enumerate(base)],
            axis=-1,
        )
        field += rng.normal(0, 6, field.shape)
        pixels = np.clip(field, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=quality)
        drawn.append(path.read_bytes())
    return root
