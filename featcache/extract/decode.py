"""One image of a shard: decoded once (with its mask) and preprocessed for every encoder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featcache.datasets import NO_DIGEST, MaskLabelError, MaskLabels, Record
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
    digest: bytes = NO_DIGEST  # the row digest of the bytes decoded (``Record.load``)
    stamp: list[int] | None = None  # ``Record.stamp()``, taken before the bytes were read


def _prepare(record: Record, encoders: list[Encoder], labels: MaskLabels | None = None) -> _Item:
    """Decode an image (and its mask) once; apply each encoder's own preprocessing.

    The file's stamp is taken first, then its bytes are read once, hashed into the row digest
    and decoded (``Record.load``); an unreadable image's row keeps ``NO_DIGEST``.
    A mask must have its (upright, cropped) image's size, else the image is unreadable (a
    label map of another size labels other pixels). It is resized with each encoder's
    geometry (nearest neighbour), then its raw values become training labels by ``labels``
    (the dataset's ``MaskLabels``: ``reduce_zero_label``, ignore value -> -1); values outside
    the declared classes make the image unreadable.
    """
    stamp = record.stamp()
    try:  # the file or a container's member, cropped to its box; then its mask
        loaded = record.load(decode_image, decode_mask)
    except BadImageError as err:
        return _Item(record, None, None, err.reason, stamp=stamp)
    image, mask = loaded.image, loaded.mask
    if mask is not None and mask.size != image.size:
        return _Item(
            record,
            None,
            None,
            f"mask {record.mask}: expected the image's size {image.width}x{image.height}; got "
            f"{mask.width}x{mask.height} pixels instead",
            stamp=stamp,
        )
    inputs = [encoder.preprocess(image) for encoder in encoders]
    masks = None
    if loaded.mask is not None:
        labels = labels or MaskLabels()
        try:
            masks = [labels.apply(e.preprocessing.mask(loaded.mask)) for e in encoders]
        except MaskLabelError as err:
            return _Item(record, None, None, f"mask {record.mask}: {err}", stamp=stamp)
    return _Item(record, inputs, masks, None, loaded.digest, stamp)
