"""One image of a shard: decoded once (with its mask) and preprocessed for every encoder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featcache.datasets import MaskLabelError, MaskLabels, Record
from featcache.encoders import Encoder
from featcache.errors import BadImageError
from featcache.images import decode_image, decode_mask


@dataclass
class _Item:
    """One image of a shard, decoded once and preprocessed for every encoder of the run."""

    record: Record
    inputs: list[torch.Tensor] | None  # per encoder: (3, H, W) float32
    masks: list[np.ndarray] | None  # per encoder: (H, W) int64 label map, when the split has masks
    error: str | None  # why the image was unreadable, else None


def _prepare(record: Record, encoders: list[Encoder], labels: MaskLabels | None = None) -> _Item:
    """Decode an image (and its mask) once; apply each encoder's own preprocessing.

    A mask must have its (upright, cropped) image's size, else the image is unreadable (a
    label map of another size labels other pixels). It is resized with each encoder's
    geometry (nearest neighbour), then its raw values become training labels by ``labels``
    (the dataset's ``MaskLabels``: ``reduce_zero_label``, ignore value -> -1); values outside
    the declared classes make the image unreadable.
    """
    try:
        image = record.decode(decode_image)  # the file or a container's member; its box
    except BadImageError as err:
        return _Item(record, None, None, err.reason)
    try:
        mask = None if record.mask is None else decode_mask(record.mask)
    except BadImageError as err:
        return _Item(record, None, None, f"mask {err}")
    if mask is not None and mask.size != image.size:
        return _Item(
            record,
            None,
            None,
            f"mask {record.mask}: expected the image's size {image.width}x{image.height}; got "
            f"{mask.width}x{mask.height} pixels instead",
        )
    inputs = [encoder.preprocess(image) for encoder in encoders]
    masks = None
    if mask is not None:
        labels = labels or MaskLabels()
        try:
            masks = [labels.apply(e.preprocessing.mask(mask)) for e in encoders]
        except MaskLabelError as err:
            return _Item(record, None, None, f"mask {record.mask}: {err}")
    return _Item(record, inputs, masks, None)
