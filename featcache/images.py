"""Decode image files to RGB, whatever mode they were saved in.

Rules (each tested):
  - EXIF orientation is applied (a photo shot in portrait reads upright).
  - Grayscale ("L", "1"), palette ("P"), CMYK and YCbCr convert to RGB with PIL's own matrices.
  - Alpha ("RGBA", "LA", "P" with transparency) is dropped, as timm's and torchvision's
    ``ImageFolder`` loaders do, so pixels match what the pretrained models were fed.
  - 16- and 32-bit integer images ("I;16", "I") are scaled to 8 bits by their type's range
    (value * 255 / 65535), not clipped at 255; float images ("F") are taken as [0, 1]. The
    scaling runs on strips of a quarter million pixels, and ``decode_image`` drops the wide
    image before making the RGB one, so decoding a 16-bit image peaks at about 5 bytes a
    pixel (the 2-byte image and its 8-bit copy, then the 8-bit copy and the 3-byte RGB image,
    plus the decoder's buffers), never float64 copies of it: a 9400 x 9400 16-bit PNG adds
    ~420 MB, not 1.8 GB (tested in tests/test_trust_datasets.py). With PIL's pixel limit
    (below) that bounds the memory of every decode.
Anything PIL cannot open or fully decode becomes a ``BadImageError`` naming the file and reason,
as does a crop box (``crop_box``) that holds no pixel of its image.
``upright_rgb`` is the same conversion for an image already open (``Encoder.preprocess`` uses it).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import ExifTags, Image, ImageOps

from featcache.errors import BadImageError

__all__ = ["crop_box", "decode_image", "decode_mask", "to_rgb", "upright_rgb"]

_HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_STRIP_PIXELS = 1 << 18  # pixels converted at a time from 16/32 bits to 8


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """The 8-bit ("L") copy of a 16/32-bit image, made a strip of rows at a time: integers
    v -> round(v * 255 / 65535) (v clipped to 0..65535; in integers: (2v + 257) // 514, the
    same value), floats f -> round(f * 255) (f clipped to [0, 1])."""
    width, height = image.size
    result = Image.new("L", image.size)
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        strip = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        if image.mode == "F":
            scaled = np.rint(np.clip(strip, 0.0, 1.0) * 255.0)
        else:
            scaled = (2 * np.clip(strip, 0, 65535).astype(np.uint32) + 257) // 514
        result.paste(Image.fromarray(scaled.astype(np.uint8)), (0, top))
    return result


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an RGB copy of ``image`` per the module rules (EXIF already applied)."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH:
        image = _high_bit_depth_to_l(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned upright by its EXIF orientation (itself when it is upright)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return image


def upright_rgb(image: Image.Image) -> Image.Image:
    """``image`` turned upright by its EXIF orientation, then ``to_rgb``, as ``decode_image``
    does after decoding; an upright RGB image is returned as is (no copy)."""
    return to_rgb(_upright(image))


def _check_pixel_limit(image: Image.Image) -> None:
    """Refuse images over ``Image.MAX_IMAGE_PIXELS`` (PIL itself only warns below 2x the limit).

    Checked explicitly rather than by turning PIL's warning into an error, because warning
    filters are process-global and decoding runs in threads.
    """
    limit = Image.MAX_IMAGE_PIXELS
    pixels = image.size[0] * image.size[1]
    if limit and pixels > limit:
        raise Image.DecompressionBombError(
            f"{pixels} pixels ({image.size[0]}x{image.size[1]}) > limit {limit}"
        )


def decode_image(source: str | os.PathLike | bytes, *, name: str | None = None) -> Image.Image:
    """Open and fully decode an image file (path or bytes) as RGB.

    Raises ``BadImageError`` for missing, empty, truncated, corrupt or non-image files and for
    images over PIL's decompression-bomb limit; ``name`` (default: the path) labels the error.
    """
    image = _upright(_decoded(source, name))
    if image.mode in _HIGH_BIT_DEPTH:
        image = _high_bit_depth_to_l(image)  # the wide image is freed before the RGB copy
    return to_rgb(image)


def decode_mask(source: str | os.PathLike | bytes, *, name: str | None = None) -> Image.Image:
    """Open and fully decode a segmentation label map, keeping its mode and values (no colour
    conversion, no EXIF rotation: label maps are stored in pixel order). Same refusals as
    ``decode_image``, the decompression-bomb limit included."""
    return _decoded(source, name)


def crop_box(image: Image.Image, box: tuple[int, int, int, int], *, name: str) -> Image.Image:
    """``image`` cropped to ``box`` = (left, top, right, bottom) pixels (PIL's convention:
    right and bottom exclusive), clipped to the image; a box with no pixel inside the image is
    a ``BadImageError`` naming ``name``."""
    left, top = max(0, box[0]), max(0, box[1])
    right, bottom = min(image.width, box[2]), min(image.height, box[3])
    if right <= left or bottom <= top:
        raise BadImageError(
            name, f"crop box {list(box)} holds no pixel of the {image.width}x{image.height} image"
        )
    return image.crop((left, top, right, bottom))


def _decoded(source: str | os.PathLike | bytes, name: str | None) -> Image.Image:
    """The fully loaded PIL image of ``source``, or ``BadImageError`` naming it and why."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if not source:
                raise BadImageError(label, "empty file (0 bytes)")
            handle = io.BytesIO(source)
        else:
            if not os.path.exists(source):
                raise BadImageError(label, "file not found")
            if os.path.getsize(source) == 0:
                raise BadImageError(label, "empty file (0 bytes)")
            handle = open(source, "rb")  # noqa: SIM115  (closed below)
        with handle:
            image = Image.open(handle)  # reads the header only
            _check_pixel_limit(image)
            image.load()  # decode now: truncation shows here, not later in a worker
            return image
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError(label, f"over PIL's decompression-bomb limit ({err})") from err
    except Image.UnidentifiedImageError as err:
        raise BadImageError(label, "not an image PIL can identify") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(label, f"cannot decode: {err}") from err
