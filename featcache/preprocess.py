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

Where "shortest" would resize to more than 2**24 pixels (a 60000x1 PNG of 257 bytes resizes to
23 million x 384), only the region the centre crop keeps is resampled, with PIL's
``resize(box=...)``, so the work is bounded by the output size. Those pixels match
resize-then-crop up to rounding, not bit for bit: PIL takes the box as float32 and its two
passes round differently (up to 2 levels of 255 on smooth content, more on pixel noise). Below
the bound the path is the libraries' own, bit for bit (both tested in tests/test_redteam_data.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from featcache import _compat  # noqa: F401  (torchvision import fix must run first)

__all__ = ["Preprocessing"]

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}
_RESIZE_MODES = ("shortest", "squash")
_MAX_RESIZED_PIXELS = 1 << 24  # 64 MiB as PIL stores RGB; 113:1 aspect at 384 px still exact


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
