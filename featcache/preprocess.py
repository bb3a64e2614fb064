"""Eval-time preprocessing, taken from each model's own pretrained config.

A ``Preprocessing`` holds the handful of numbers that define how a PIL image becomes the
``(3, H, W)`` float tensor an encoder was trained on, and applies them with the same
torchvision functional ops that timm's ``transforms_imagenet_eval`` and open_clip's
``image_transform(is_train=False)`` compose, so the tensors are identical (tested against both).
It also applies the same geometry to segmentation masks (nearest neighbour, no normalisation),
so mask pixel (i, j) lines up with image pixel (i, j) after preprocessing.

Geometry, for an input of size (h, w) and target (H, W):
  shortest: resize the shorter side to floor(H / crop_pct) keeping aspect, centre-crop (H, W)
  squash:   resize to (floor(H / crop_pct), floor(W / crop_pct)) ignoring aspect, centre-crop

``Geometry`` is that, plus the patch grid, as a comparable record: for an original image of
(w, h) pixels it gives the box of the original the model input covers and the box under each
token, in original-image pixels, with torchvision's integer sizes and rounded crop offsets.
Stores record it (``Encoder.describe()["geometry"]``); ``token_offset`` measures how far apart
the tokens of two geometries land once the source grid is mapped onto the target grid by grid
fraction, as the stitch's bilinear resampling does, so pairing can refuse stores whose paired
tokens would see different pixels.

Where "shortest" would resize to more than 2**24 pixels (a 60000x1 PNG of 257 bytes resizes to
23 million x 384), only the region the centre crop keeps is resampled, with PIL's
``resize(box=...)``, so the work is bounded by the output size. Those pixels match
resize-then-crop up to rounding, not bit for bit: PIL takes the box as float32 and its two
passes round differently (up to 2 levels of 255 on smooth content, more on pixel noise). Below
the bound the path is the libraries' own, bit for bit (both tested in tests/test_redteam_data.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image

from featcache import _compat  # noqa: F401  (torchvision import fix: must run before torchvision)

# isort: split
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = ["Preprocessing", "Geometry", "token_offset", "REFERENCE_SIZES", "GEOMETRY_KEYS"]

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}
_RESIZE_MODES = ("shortest", "squash")
_MAX_RESIZED_PIXELS = 1 << 24  # 64 MiB as PIL stores RGB; 113:1 aspect at 384 px still exact
GEOMETRY_KEYS = ("resize_mode", "crop_pct")  # what a run may override on every model
# Original-image sizes (w, h) pairing compares geometries at: 1:1, 4:3, 3:4, 16:9.
REFERENCE_SIZES = ((640, 640), (640, 480), (480, 640), (640, 360))


@dataclass(frozen=True)
class Preprocessing:
    """How one encoder turns an RGB PIL image into its input tensor.

    Attributes:
        image_size: (H, W) of the tensor the encoder consumes.
        resize_mode: "shortest" (keep aspect, then centre-crop) or "squash" (ignore aspect).
        crop_pct: fraction of the resized image kept by the centre crop (1.0: no crop margin).
        interpolation: resampling filter name for images ("bicubic", "bilinear", ...).
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
    """

    image_size: tuple[int, int]
    resize_mode: str
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"Expected resize_mode in {_RESIZE_MODES}. Got {self.resize_mode!r} instead."
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"Expected interpolation in {sorted(_INTERPOLATIONS)}. "
                f"Got {self.interpolation!r} instead."
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"Expected 0 < crop_pct <= 1. Got {self.crop_pct} instead.")

    # -- construction from the libraries' configs ---------------------------------------------
    @classmethod
    def from_timm(cls, data_config: dict, image_size: tuple[int, int]) -> Preprocessing:
        """From ``timm.data.resolve_model_data_config(model)``; size is the model's real input.

        timm's "center" crop mode is our "shortest"; its "squash" is ours. "border" is rejected.
        """
        crop_mode = data_config.get("crop_mode", "center")
        modes = {"center": "shortest", "squash": "squash"}
        if crop_mode not in modes:
            raise ValueError(
                f"Expected timm crop_mode 'center' or 'squash'. Got {crop_mode!r} instead."
            )
        return cls(
            image_size=tuple(image_size),
            resize_mode=modes[crop_mode],
            crop_pct=float(data_config.get("crop_pct") or 0.875),
            interpolation=data_config.get("interpolation", "bicubic"),
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
        )

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict, image_size: tuple[int, int]) -> Preprocessing:
        """From open_clip's merged ``PreprocessCfg`` dict (model config + pretrained tag)."""
        mode = preprocess_cfg.get("resize_mode", "shortest")
        if mode not in _RESIZE_MODES:
            raise ValueError(
                f"Expected open_clip resize_mode in {_RESIZE_MODES}. Got {mode!r} instead."
            )
        return cls(
            image_size=tuple(image_size),
            resize_mode=mode,
            crop_pct=1.0,
            interpolation=preprocess_cfg.get("interpolation", "bicubic"),
            mean=tuple(float(v) for v in preprocess_cfg["mean"]),
            std=tuple(float(v) for v in preprocess_cfg["std"]),
        )

    def with_geometry(
        self, *, resize_mode: str | None = None, crop_pct: float | None = None
    ) -> Preprocessing:
        """The same preprocessing with another resize mode and / or crop fraction (None: keep);
        input size, interpolation and normalisation stay the model's own."""
        changes = {"resize_mode": resize_mode, "crop_pct": crop_pct}
        changes = {k: v for k, v in changes.items() if v is not None}
        if "crop_pct" in changes:
            changes["crop_pct"] = float(changes["crop_pct"])
        updated = replace(self, **changes) if changes else self
        height, width = updated.image_size
        if updated.resize_mode == "shortest" and height != width:
            raise ValueError(
                f"Expected a square input for resize_mode 'shortest'. Got {updated.image_size} "
                "(use resize_mode squash)."
            )
        return updated

    # -- application ---------------------------------------------------------------------------
    def _resize_size(self) -> int | tuple[int, int]:
        height, width = self.image_size
        scaled = (math.floor(height / self.crop_pct), math.floor(width / self.crop_pct))
        if self.resize_mode == "squash":
            return scaled
        if scaled[0] != scaled[1]:
            raise ValueError(
                f"Expected a square image_size for resize_mode 'shortest'. Got {self.image_size}."
            )
        return scaled[0]  # scalar: torchvision resizes the shorter side, keeping aspect

    def _geometry(self, image: Image.Image, interpolation: InterpolationMode) -> Image.Image:
        size = self._resize_size()
        box = self._kept_box(image.size, size) if isinstance(size, int) else None
        if box is not None:
            height, width = self.image_size
            return image.resize((width, height), TF.pil_modes_mapping[interpolation], box=box)
        resized = TF.resize(image, size, interpolation=interpolation)
        return TF.center_crop(resized, list(self.image_size))

    def _kept_box(self, source: tuple[int, int], short: int) -> tuple[float, ...] | None:
        """The source region the centre crop keeps, when the shorter side resized to ``short``
        would exceed ``_MAX_RESIZED_PIXELS``; else None. Sizes and offsets as torchvision's."""
        width, height = source
        long = int(short * max(width, height) / min(width, height))
        if short * long <= _MAX_RESIZED_PIXELS:
            return None
        new_width, new_height = (short, long) if width <= height else (long, short)
        crop_height, crop_width = self.image_size
        left = round((new_width - crop_width) / 2.0)
        top = round((new_height - crop_height) / 2.0)
        x_scale, y_scale = width / new_width, height / new_height
        return (
            left * x_scale,
            top * y_scale,
            (left + crop_width) * x_scale,
            (top + crop_height) * y_scale,
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float32 tensor (3, H, W)."""
        cropped = self._geometry(image, _INTERPOLATIONS[self.interpolation])
        return TF.normalize(TF.to_tensor(cropped), self.mean, self.std)

    def mask(self, mask: Image.Image) -> np.ndarray:
        """Label-map PIL image -> int64 (H, W) array, image geometry, nearest neighbour."""
        cropped = self._geometry(mask, InterpolationMode.NEAREST)
        return np.asarray(cropped, dtype=np.int64)

    def to_dict(self) -> dict:
        """JSON-ready description; part of an encoder's fingerprint."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# -- geometry --------------------------------------------------------------------------------------
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in original-image pixels


def _shortest_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's resize of the shorter side to ``short``: (new width, new height)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


@dataclass(frozen=True)
class Geometry:
    """Which pixels of the original image each token of an encoder's input sees.

    Attributes:
        image_size: (H, W) of the model input.
        resize_mode: "shortest" or "squash" (see ``Preprocessing``).
        crop_pct: fraction of the resized image the centre crop keeps.
        grid: (rows, columns) of patch tokens.
        patch_size: (height, width) of one patch in input pixels; tokens tile the input from
            its top-left corner, grid * patch_size pixels of it.
    """

    image_size: tuple[int, int]
    resize_mode: str
    crop_pct: float
    grid: tuple[int, int]
    patch_size: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("image_size", "grid", "patch_size"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @classmethod
    def from_preprocessing(
        cls,
        preprocessing: Preprocessing,
        grid: tuple[int, int],
        patch_size: tuple[int, int] | None = None,
    ) -> Geometry:
        """Geometry of ``preprocessing`` with a patch ``grid``; patch size defaults to the
        input size over the grid (exact for every ViT here)."""
        height, width = preprocessing.image_size
        if patch_size is None:
            patch_size = (height // grid[0], width // grid[1])
        pp = preprocessing
        return cls(pp.image_size, pp.resize_mode, pp.crop_pct, grid, patch_size)

    @classmethod
    def from_description(cls, encoder: Mapping) -> Geometry:
        """From an encoder description (``Encoder.describe()``, a store's ``encoder`` attrs):
        its ``geometry`` record, or, for stores written before it was recorded, derived from
        its ``preprocessing`` and ``layout``."""
        if encoder.get("geometry"):
            return cls.from_dict(encoder["geometry"])
        pp = encoder["preprocessing"]
        preprocessing = Preprocessing(
            image_size=tuple(pp["image_size"]),
            resize_mode=pp["resize_mode"],
            crop_pct=pp["crop_pct"],
            interpolation=pp["interpolation"],
            mean=tuple(pp["mean"]),
            std=tuple(pp["std"]),
        )
        return cls.from_preprocessing(preprocessing, tuple(encoder["layout"]["grid"]))

    @classmethod
    def from_dict(cls, data: Mapping) -> Geometry:
        return cls(
            image_size=tuple(data["image_size"]),
            resize_mode=str(data["resize_mode"]),
            crop_pct=float(data["crop_pct"]),
            grid=tuple(data["grid"]),
            patch_size=tuple(data["patch_size"]),
        )

    def to_dict(self) -> dict:
        """JSON-ready; ``Geometry.from_dict`` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        height, width = self.image_size
        return (
            f"{self.resize_mode} resize, crop_pct {self.crop_pct:g}, {width}x{height} input, "
            f"{self.grid[0]}x{self.grid[1]} grid of {self.patch_size[1]} px patches"
        )

    # -- boxes in original-image pixels -----------------------------------------------------
    def input_box(self, width: int, height: int) -> Box:
        """The box of a (width, height) original image that the model input covers.

        Sizes and crop offsets are torchvision's (int sizes, ``round`` offsets); PIL's resize
        maps the resized image's edges onto the original's, so a resized pixel x covers
        original x * width / new_width onwards.
        """
        crop_h, crop_w = self.image_size
        scaled = (math.floor(crop_h / self.crop_pct), math.floor(crop_w / self.crop_pct))
        if self.resize_mode == "squash":
            new_w, new_h = scaled[1], scaled[0]
        else:
            new_w, new_h = _shortest_size(width, height, scaled[0])
        left = round((new_w - crop_w) / 2.0)
        top = round((new_h - crop_h) / 2.0)
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)

    def grid_box(self, width: int, height: int) -> Box:
        """The box the token grid covers (the input box, less any pixels past the last patch)."""
        left, top, right, bottom = self.input_box(width, height)
        sx = (right - left) / self.image_size[1]
        sy = (bottom - top) / self.image_size[0]
        rows, cols = self.grid
        right = left + cols * self.patch_size[1] * sx
        bottom = top + rows * self.patch_size[0] * sy
        return (left, top, right, bottom)

    def token_box(self, width: int, height: int, i: int, j: int) -> Box:
        """The box under token (row i, column j)."""
        left, top, right, bottom = self.grid_box(width, height)
        rows, cols = self.grid
        pw, ph = (right - left) / cols, (bottom - top) / rows
        return (left + j * pw, top + i * ph, left + (j + 1) * pw, top + (i + 1) * ph)

    def token_centres(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(y of each row, x of each column) of the token centres, original pixels."""
        left, top, right, bottom = self.grid_box(width, height)
        rows, cols = self.grid
        ys = top + (np.arange(rows) + 0.5) / rows * (bottom - top)
        xs = left + (np.arange(cols) + 0.5) / cols * (right - left)
        return ys, xs


def token_offset(
    source: Geometry, target: Geometry, sizes: Iterable[tuple[int, int]] = REFERENCE_SIZES
) -> float:
    """Largest distance, in target patches, between what target token (i, j) sees and what
    the source grid contributes to it, over original images of ``sizes`` (w, h).

    The stitch resamples the source grid onto the target grid bilinearly with
    ``align_corners=False``: target token (i, j) reads the source grid at the same grid
    fraction ((i + 0.5) / rows, (j + 0.5) / columns). So the source point is that fraction of
    the source grid box; the target token's centre that fraction of the target's. Their
    distance is measured per axis in target patches (a squash geometry's patches are not
    square in original pixels) and combined as a Euclidean norm.
    """
    worst = 0.0
    for width, height in sizes:
        s_left, s_top, s_right, s_bottom = source.grid_box(width, height)
        t_left, t_top, t_right, t_bottom = target.grid_box(width, height)
        rows, cols = target.grid
        fy = (np.arange(rows) + 0.5) / rows
        fx = (np.arange(cols) + 0.5) / cols
        dy = np.abs((s_top + fy * (s_bottom - s_top)) - (t_top + fy * (t_bottom - t_top)))
        dx = np.abs((s_left + fx * (s_right - s_left)) - (t_left + fx * (t_right - t_left)))
        dy, dx = dy / ((t_bottom - t_top) / rows), dx / ((t_right - t_left) / cols)
        worst = max(worst, float(np.hypot(dy[:, None], dx[None, :]).max()))
    return worst
