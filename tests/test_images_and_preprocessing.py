"""Decoding odd image files to RGB, and preprocessing equal to the libraries' own transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import featcache
from featcache.errors import BadImageError
from featcache.images import decode_image


def _gradient(width=40, height=30):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path):
    array = _gradient(40, 30)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = _save(image, tmp_path / "rot.jpg", exif=exif, quality=95)
    decoded = decode_image(path)
    assert decoded.size == (30, 40)  # width and height swapped


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "RGBA", "LA", "YCbCr"])
def test_modes_convert_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(_gradient())
    image = rgb.convert(mode)
    suffix = ".jpg" if mode in ("CMYK", "YCbCr") else ".png"
    decoded = decode_image(_save(image, tmp_path / f"img{suffix}"))
    assert decoded.mode == "RGB" and decoded.size == rgb.size


def test_rgba_drops_alpha_like_library_loaders(tmp_path):
    rgba = Image.fromarray(np.dstack([_gradient(), np.full((30, 40), 7, np.uint8)]), "RGBA")
    decoded = decode_image(_save(rgba, tmp_path / "a.png"))
    assert np.array_equal(np.asarray(decoded), _gradient())


def test_palette_with_transparency(tmp_path):
    image = Image.fromarray(_gradient()).convert("P")
    image.info["transparency"] = 0
    decoded = decode_image(_save(image, tmp_path / "p.png", transparency=0))
    assert decoded.mode == "RGB"


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    decoded = np.asarray(decode_image(_save(image, tmp_path / "deep.png")))
    assert decoded[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"this is text, not a jpeg", "not an image"),
    ],
)
def test_bad_bytes(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_gradient(200, 200)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(BadImageError, match="cut.jpg"):
        decode_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="not found"):
        decode_image(tmp_path / "nope.png")


def test_decompression_bomb(tmp_path, monkeypatch):
    path = _save(Image.fromarray(_gradient(100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 = 10000 pixels
    with pytest.raises(BadImageError, match="decompression-bomb"):
        decode_image(path)


def _library_transform(encoder, own: bool = False):
    """The library's eval transform; at the encoder's geometry (a preset's shared one) unless
    ``own``, which keeps the library's pretrained crop."""
    pp = encoder.pretrained_preprocessing if own else encoder.preprocessing
    if encoder.spec["library"] == "timm":
        import timm.data

        config = timm.data.resolve_model_data_config(encoder.module)
        config["input_size"] = (3, *encoder.image_size)
        if not own:
            config["crop_pct"] = pp.crop_pct
            config["crop_mode"] = {"shortest": "center", "squash": "squash"}[pp.resize_mode]
        return timm.data.create_transform(**config, is_training=False)
    import open_clip

    return open_clip.image_transform(
        encoder.image_size,
        is_train=False,
        mean=pp.mean,
        std=pp.std,
        resize_mode=pp.resize_mode,
        interpolation=pp.interpolation,
    )


@pytest.mark.parametrize(
    "family_id", ["dinov2", "dinov3", "siglip2", "clip-open_clip", "siglip2-open_clip"]
)
@pytest.mark.parametrize("size", [(200, 150), (97, 240), (128, 128)])
def test_preprocess_equals_library_transform(encoder_cache, family_id, size):
    encoder = encoder_cache(family_id)
    image = Image.fromarray(_gradient(*size))
    ours = encoder.preprocess(image)
    assert ours.shape == (3, *encoder.image_size)
    assert torch.equal(ours, _library_transform(encoder)(image))
    own = encoder.pretrained_preprocessing(image)  # the library's own eval crop, unchanged
    assert torch.equal(own, _library_transform(encoder, own=True)(image))


def test_open_clip_siglip2_uses_tag_preprocessing(encoder_cache):
    pp = encoder_cache("siglip2-open_clip").preprocessing
    assert pp.mean == (0.5, 0.5, 0.5) and pp.resize_mode == "squash"


def test_mask_follows_image_geometry(encoder_cache):
    encoder = encoder_cache("dinov2")
    width, height = 200, 150
    labels = np.zeros((height, width), np.uint8)
    labels[:, width // 2 :] = 3  # right half is class 3
    mask = encoder.preprocessing.mask(Image.fromarray(labels))
    assert mask.shape == encoder.image_size and mask.dtype == np.int64
    assert set(np.unique(mask)) == {0, 3}
    half = encoder.image_size[1] // 2
    assert (mask[:, : half - 1] == 0).all() and (mask[:, half + 1 :] == 3).all()


def test_preprocessing_rejects_unknown_mode():
    with pytest.raises(ValueError, match="resize_mode"):
        featcache.Preprocessing((8, 8), "longest", 1.0, "bicubic", (0, 0, 0), (1, 1, 1))
