"""Red-team findings on datasets and images: symlinks out of the data root, huge integer labels,
extreme aspect ratios, and ``Encoder.preprocess`` on any PIL mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import _csv, _png
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from featcache.datasets import ManifestError, load_dataset
from featcache.images import decode_image, to_rgb
from featcache.preprocess import Preprocessing


def _error(source) -> str:
    with pytest.raises(ManifestError) as info:
        load_dataset(source)
    return str(info.value)


# ---- 1. the data root holds on resolved paths ---------------------------------------------


@pytest.fixture()
def outside(tmp_path):
    """A folder beside the data root holding a secret image and a class folder of one."""
    _png(tmp_path / "outside" / "secret.png", 9)
    _png(tmp_path / "outside" / "dog" / "x.png", 9)
    return tmp_path / "outside"


# case -> (files to create under the root, link under the root, its target, path the error names)
FOLDER_ESCAPES = {
    "image-file": (["cat/ok.png"], "cat/leak.png", "secret.png", "cat/leak.png"),
    "class-folder": (["cat/ok.png"], "dog", "dog", "dog"),
    "subfolder-in-class": (["cat/ok.png"], "cat/deeper", "dog", "cat/deeper"),
    "class-folder-in-split": (["train/cat/a.png", "val/cat/b.png"], "val/dog", "dog", "val/dog"),
    "split-folder": (["train/cat/a.png"], "val", ".", "val/dog"),
}


@pytest.mark.parametrize("case", FOLDER_ESCAPES)
def test_folder_symlinks_resolving_outside_the_root_are_refused(tmp_path, outside, case):
    files, link, target, named = FOLDER_ESCAPES[case]
    root = tmp_path / "data"
    for name in files:
        _png(root / name)
    os.symlink(os.path.normpath(outside / target), root / link)
    message = _error(root)
    assert str(root / named) in message and str(outside) in message
    assert "resolve inside the data root" in message and "\n" not in message


def test_folder_symlinks_inside_the_root_are_followed(tmp_path):
    root = tmp_path / "data"
    _png(root / "store" / "cats" / "a.png")
    _png(root / "store" / "dogs" / "b.png")
    _png(root / "store" / "dogs" / "more" / "c.png")
    os.symlink(root / "store" / "cats", root / "cat")  # a class folder
    os.makedirs(root / "dog")
    os.symlink(root / "store" / "dogs" / "b.png", root / "dog" / "b.png")  # an image file
    os.symlink(root / "store" / "dogs" / "more", root / "dog" / "more")  # a subfolder
    os.symlink(root / "dog", root / "dog" / "loop")  # a loop is walked once
    data = load_dataset(root)
    assert data.classes == ("cat", "dog", "store")
    assert [(r.id, r.label) for r in data.records] == [
        ("cat/a.png", 0),
        ("dog/b.png", 1),
        ("dog/more/c.png", 1),
        ("store/cats/a.png", 2),
        ("store/dogs/b.png", 2),
        ("store/dogs/more/c.png", 2),
    ]


def _manifest(path, suffix, rows):
    file = path / f"m{suffix}"
    if suffix == ".csv":
        return _csv(file, rows)
    keys = ("path", "label", "split", "mask")
    file.write_text("\n".join(json.dumps(dict(zip(keys, row, strict=True))) for row in rows))
    return file


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize("column", ["path", "mask"])
@pytest.mark.parametrize("link", ["file", "folder"])
def test_manifest_paths_resolving_outside_the_root_are_refused(
    tmp_path, outside, suffix, column, link
):
    root = tmp_path / "data"
    _png(root / "imgs" / "ok.png")
    if link == "file":
        os.symlink(outside / "secret.png", root / "imgs" / "leak.png")
        bad = "imgs/leak.png"
    else:  # a folder link: refused even though the file under it does not exist
        os.symlink(outside, root / "elsewhere")
        bad = "elsewhere/not_yet.png"
    row = (bad, "cat", "train", "m.png") if column == "path" else ("b.png", "cat", "train", bad)
    manifest = _manifest(root, suffix, [("imgs/ok.png", "cat", "train", "m0.png"), row])
    message = _error(manifest)
    line = 3 if suffix == ".csv" else 2
    assert f"line {line} of {manifest}" in message and repr(bad) in message
    assert column in message and str(outside) in message
    assert "resolves inside the data root" in message and "\n" not in message


def test_manifest_symlinks_inside_the_root_are_fine(tmp_path):
    root = tmp_path / "data"
    _png(root / "store" / "a.png")
    _png(root / "store" / "ma.png")
    os.symlink(root / "store", root / "imgs")
    os.symlink(root / "store" / "a.png", root / "alias.png")
    manifest = _csv(
        root / "m.csv",
        [("imgs/a.png", "cat", "train", "imgs/ma.png"), ("alias.png", "dog", "train", "x.png")],
    )
    data = load_dataset(manifest)
    assert [(r.id, r.path) for r in data.records] == [
        ("alias.png", str(root / "alias.png")),
        ("imgs/a.png", str(root / "imgs" / "a.png")),
    ]


# ---- 2. integer labels are bounded by what the dataset holds -------------------------------


@pytest.mark.parametrize(
    "labels, line, value, distinct",
    [
        ([0, 99999999999], 3, "99999999999", 2),  # over the 100000-class ceiling
        ([0, 3000000, 0], 3, "3000000", 2),
        ([5, 5, 1000], 4, "1000", 2),  # 1001 classes for 3 rows
        (list(range(100)) + [1010], 102, "1010", 101),  # max + 1 > max(1000, 10 x 101 rows)
        ([0] * 20000 + [100000], 20002, "100000", 2),  # the ceiling binds before 10 x rows
    ],
)
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_sparse_integer_labels_are_refused(tmp_path, suffix, labels, line, value, distinct):
    rows = [(f"{i}.png", label, "train", "") for i, label in enumerate(labels)]
    manifest = _manifest(tmp_path, suffix, rows)
    message = _error(manifest)
    line = line if suffix == ".csv" else line - 1
    assert f"line {line} of {manifest}" in message and value in message
    assert f"{distinct} distinct labels" in message and "class names" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "labels, classes",
    [
        ([0, 999, 17], 1000),  # a few rows of ImageNet keep its 1000 classes
        ([0] * 500 + [4999], 5000),  # max + 1 == 10 x rows
        ([3, 1], 4),
    ],
)
def test_integer_labels_within_bounds_load(tmp_path, labels, classes):
    rows = [(f"{i}.png", label) for i, label in enumerate(labels)]
    data = load_dataset(_csv(tmp_path / "m.csv", rows, header=("path", "label")))
    assert data.classes == tuple(str(i) for i in range(classes))
    assert sorted(r.label for r in data.records) == sorted(labels)


# ---- 3. extreme aspect ratios cannot exhaust memory ----------------------------------------

_PEAK = """
import json, resource, sys
import numpy as np
from PIL import Image
from featcache.images import decode_image
from featcache.preprocess import Preprocessing

pp = Preprocessing((336, 336), "shortest", 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
size = [line for line in open("/proc/self/status") if line.startswith("VmSize:")][0]
headroom = int(size.split()[1]) * 1024 + (1 << 30)  # the old path needs tens of GB: fail fast
resource.setrlimit(resource.RLIMIT_AS, (headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = pp(decode_image(sys.argv[1]))
with Image.open(sys.argv[2]) as handle:
    mask = pp.mask(handle.copy())
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps([list(image.shape), list(mask.shape), np.unique(mask).tolist(), grown // 1024]))
"""


@pytest.mark.parametrize("size", [(60000, 1), (1, 60000)])
def test_extreme_aspect_preprocesses_in_little_memory(tmp_path, size):
    image = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 10, 10)).save(image)
    assert image.stat().st_size < 1000  # a few hundred bytes on disk
    mask = tmp_path / "strip_mask.png"
    Image.new("L", size, 3).save(mask)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(image), str(mask)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shape, mask_shape, labels, grown_mb = json.loads(done.stdout)
    assert shape == [3, 336, 336] and mask_shape == [336, 336] and labels == [3]
    assert grown_mb < 100, f"peak memory grew by {grown_mb} MB"


def _smooth(width, height):
    y, x = np.mgrid[0:height, 0:width]
    channels = [np.sin(x / 37.0), np.cos(y / 5.0), np.sin((x + y) / 53.0)]
    return (127.5 + 127 * np.stack(channels, -1)).astype(np.uint8)


def _resize_then_crop(pp: Preprocessing, image, interpolation) -> Image.Image:
    short = int(pp.image_size[0] / pp.crop_pct)
    return TF.center_crop(TF.resize(image, short, interpolation=interpolation), list(pp.image_size))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest"])
@pytest.mark.parametrize("size", [(4000, 30), (30, 4000)])
def test_moderate_aspect_matches_resize_then_crop_closely(size, interpolation):
    """4000x30 at 384 px would resize to 51200x384, past the materialised bound."""
    pp = Preprocessing((336, 336), "shortest", 0.875, interpolation, (0.0,) * 3, (1.0,) * 3)
    image = Image.fromarray(_smooth(*size))
    reference = TF.to_tensor(_resize_then_crop(pp, image, InterpolationMode(interpolation)))
    ours = pp(image)
    assert ours.shape == reference.shape == (3, 336, 336)
    assert (ours - reference).abs().max() <= 2.5 / 255
    assert (ours - reference).abs().mean() < 0.1 / 255

    labels = np.zeros(size[::-1], np.uint8)
    labels[: size[1] // 2] = 1  # top half class 1
    labels[:, : size[0] // 2] += 2  # left half + 2
    expected = np.asarray(_resize_then_crop(pp, Image.fromarray(labels), InterpolationMode.NEAREST))
    mask = pp.mask(Image.fromarray(labels))
    assert mask.shape == (336, 336) and set(np.unique(mask)) <= {0, 1, 2, 3}
    assert (mask == expected).mean() > 0.99


ORDINARY = [(200, 150), (97, 240), (128, 128), (640, 480), (333, 1000), (37, 29), (1, 200)]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest"])
@pytest.mark.parametrize("image_size, crop_pct", [((56, 56), 0.875), ((336, 336), 1.0)])
def test_ordinary_images_stay_bit_identical(image_size, crop_pct, interpolation):
    pp = Preprocessing(image_size, "shortest", crop_pct, interpolation, (0.4,) * 3, (0.2,) * 3)
    rng = np.random.default_rng(0)
    for width, height in [*ORDINARY, (300, 2), (2000, 100)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        cropped = _resize_then_crop(pp, image, InterpolationMode(interpolation))
        expected = TF.normalize(TF.to_tensor(cropped), pp.mean, pp.std)
        assert torch.equal(pp(image), expected), (width, height)
        labels = Image.fromarray(rng.integers(0, 5, (height, width), dtype=np.uint8))
        nearest = _resize_then_crop(pp, labels, InterpolationMode.NEAREST)
        assert np.array_equal(pp.mask(labels), np.asarray(nearest, np.int64)), (width, height)


# ---- 4. Encoder.preprocess takes any PIL mode ----------------------------------------------


def _gradient(width=40, height=30):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)


def _image_in(mode: str) -> tuple[Image.Image, str, dict]:
    """An image of ``mode``, the suffix that stores it losslessly, and save options."""
    rgb = Image.fromarray(_gradient())
    gray = _gradient()[..., 0].astype(np.float64)
    if mode == "I;16":
        return Image.fromarray((gray * 257).astype(np.uint16)), ".png", {}
    if mode == "I":
        return Image.fromarray((gray * 65535 / 255).astype(np.int32)), ".tiff", {}
    if mode == "F":
        return Image.fromarray((gray / 255).astype(np.float32)), ".tiff", {}
    if mode == "P+transparency":
        return rgb.convert("P"), ".png", {"transparency": 0}
    if mode == "RGB+EXIF":
        exif = rgb.getexif()
        exif[0x0112] = 6  # rotate 90 CW on display
        return rgb, ".jpg", {"exif": exif, "quality": 95}
    return rgb.convert(mode), ".tiff" if mode == "CMYK" else ".png", {}


MODES = ["CMYK", "L", "P", "P+transparency", "RGBA", "LA", "I;16", "I", "F", "1", "RGB+EXIF"]


@pytest.mark.parametrize("mode", MODES)
def test_encoder_preprocess_takes_any_mode_like_extraction(encoder_cache, tmp_path, mode):
    encoder = encoder_cache("dinov2")
    image, suffix, options = _image_in(mode)
    path = tmp_path / f"img{suffix}"
    image.save(path, **options)
    with Image.open(path) as opened:
        assert opened.mode == mode.split("+")[0]
        ours = encoder.preprocess(opened)  # the README's encoder.preprocess(Image.open(path))
    extracted = encoder.preprocess(decode_image(path))
    assert ours.shape == (3, *encoder.image_size) and torch.equal(ours, extracted)
    if mode != "RGB+EXIF":
        assert torch.equal(encoder.preprocess(image), encoder.preprocessing(to_rgb(image)))


@pytest.mark.parametrize("problem", ["over the pixel limit", "truncated", "missing"])
def test_a_bad_mask_is_recorded_for_its_image_not_a_crash(
    encoder_cache, tmp_path, monkeypatch, problem
):
    """Masks get the image decoder's refusals (the decompression-bomb limit included), so
    ``--on-bad-image skip`` records them with the file named instead of stopping the run."""
    from featcache.datasets import Record
    from featcache.extract.decode import _prepare

    image, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    _png(image)
    Image.fromarray(np.random.default_rng(0).integers(0, 150, (40, 60), np.uint8)).save(mask)
    if problem == "over the pixel limit":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the image itself is 24x24
    elif problem == "truncated":
        mask.write_bytes(mask.read_bytes()[:1000])
    else:
        mask.unlink()
    item = _prepare(Record("a.png", str(image), 0, "train", str(mask)), [encoder_cache("dinov2")])
    assert item.inputs is None and item.error.startswith(f"mask {mask}: ")
    expected = {"over the pixel limit": "decompression-bomb", "truncated": "cannot decode"}
    assert expected.get(problem, "file not found") in item.error
