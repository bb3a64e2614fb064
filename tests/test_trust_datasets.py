"""Hostile input files (issue 21, point 4): paths in parquet cells stay inside the data root and
a ``bytes`` field must hold bytes, the parquet files of a dataset agree on their ClassLabel
names, a segmentation annotation has its image's size, deep or non-finite JSON and bad UTF-8
are one-line errors, a brace pattern cannot exhaust memory, and a 16-bit PNG decodes in
bounded memory. Each case: a one-line error naming the file and value, or a recorded skip."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from dataset_layouts import corpus_images, make_aircraft, make_fmow, make_inat2021
from PIL import Image
from test_ade20k import make_ade20k
from test_data import _png
from test_datasets_paper import _error, _extract
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.datasets import load_dataset
from featcache.errors import BadImageError

IMAGES = corpus_images(3)
DEEP = "[" * 200_000 + "]" * 200_000  # the C parser recurses once per level
ROOT = Path(__file__).resolve().parents[1]


def _cli_error(args: list[str]) -> str:
    """Run ``featcache ARGS``; it must end with exit status 2 and one ``error:`` line."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert line.startswith("error: ")
    return line


def _extract_cli(data, out) -> list[str]:
    return ["extract", "--model", "dinov2-tiny", "--data", str(data), "--layers", "1",
            "--out", str(out)]  # fmt: skip


# ---- parquet: a bytes field holds bytes; a path stays inside the data root ------------------


def _parquet(file: Path, images: list, image_type, names=None) -> Path:
    """One parquet file: an ``image`` column of ``image_type`` holding ``images``, a ``label``
    column (0, 1, ...), and when ``names`` is given a ClassLabel feature of those names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}}
    if names is not None:
        features["label"] = {"names": list(names), "_type": "ClassLabel"}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = pa.schema([pa.field("image", image_type), pa.field("label", pa.int64())], metadata)
    labels = [i % 2 for i in range(len(images))]
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "label": labels}, schema=schema), file)
    return file


def _string_struct():
    import pyarrow as pa

    return pa.struct([("bytes", pa.string()), ("path", pa.string())])


def test_parquet_bytes_field_holding_a_path_is_refused_not_read(tmp_path):
    secret = _png(tmp_path / "secret.png", 200)
    file = _parquet(tmp_path / "hub" / "train.parquet",
                    [{"bytes": str(secret), "path": None}], _string_struct())  # fmt: skip
    (record,) = load_dataset(file).records
    with pytest.raises(BadImageError) as info:
        record.decode()
    message = str(info.value)
    shown = repr(str(secret))[:200]  # a long value is shown cut at 200 characters
    assert str(file) in message and "row 0" in message and shown in message
    assert "bytes" in message and "str" in message and "\n" not in message


def test_extract_cli_refuses_a_bytes_field_holding_a_path(tmp_path):
    secret = _png(tmp_path / "secret.png", 200)
    file = _parquet(tmp_path / "hub" / "train.parquet",
                    [{"bytes": str(secret), "path": None}], _string_struct())  # fmt: skip
    line = _cli_error(_extract_cli(file, tmp_path / "out"))
    assert str(file) in line and repr(str(secret))[:200] in line


@pytest.fixture()
def string_column(tmp_path):
    """A parquet file whose ``image`` column is a string per row: a path inside the root, an
    absolute path outside it, a relative one leaving it, and a symlink inside the root that
    resolves outside it."""
    import pyarrow as pa

    secret = _png(tmp_path / "secret.png", 200)
    root = tmp_path / "hub"
    _png(root / "images" / "a.png", 50)
    root.mkdir(exist_ok=True)
    os.symlink(secret, root / "images" / "link.png")
    values = ["images/a.png", str(secret), "../secret.png", "images/link.png"]
    file = _parquet(root / "train.parquet", values, pa.string())
    return file, {f"train.parquet/{i}": value for i, value in enumerate(values)}


def test_parquet_string_image_paths_resolve_inside_the_data_root(string_column):
    file, values = string_column
    records = {record.id: record for record in load_dataset(file).records}
    image = records["train.parquet/0"].decode()
    assert image.size == (4, 4) and image.getpixel((0, 0)) == (50, 50, 50)
    for rid in ("train.parquet/1", "train.parquet/2", "train.parquet/3"):
        with pytest.raises(BadImageError) as info:
            records[rid].decode()
        message = str(info.value)
        assert str(file) in message and repr(values[rid]) in message, message
        assert f"data root {file.parent}" in message and "\n" not in message


def test_extract_records_parquet_paths_outside_the_root_as_skips(
    string_column, tmp_path, encoder_cache
):
    file, values = string_column
    _, result = _extract(file, tmp_path / "stores", encoder_cache("dinov2"), split="train")
    skipped = {entry["id"]: entry["reason"] for entry in result["stores"][0]["skipped"]}
    assert sorted(skipped) == ["train.parquet/1", "train.parquet/2", "train.parquet/3"]
    for rid, reason in skipped.items():
        assert repr(values[rid]) in reason and f"data root {file.parent}" in reason


# ---- parquet: one ClassLabel mapping ----------------------------------------------------------


def test_parquet_files_with_different_class_label_names_are_refused(tmp_path):
    import pyarrow as pa

    binary = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": data, "path": f"{name}.jpg"} for name, data, _ in IMAGES]
    first = _parquet(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet", rows, binary,
                     ["cat", "dog"])  # fmt: skip
    second = _parquet(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet", rows, binary,
                      ["dog", "cat"])  # fmt: skip
    message = _error(tmp_path / "hub")
    assert str(first) in message and str(second) in message
    assert "['cat', 'dog']" in message and "['dog', 'cat']" in message
    _parquet(second, rows, binary, ["cat", "dog"])
    assert load_dataset(tmp_path / "hub").classes == ("cat", "dog")


# ---- an annotation of another size than its image -------------------------------------------


def test_ade20k_annotation_of_another_size_is_a_recorded_skip(tmp_path, encoder_cache):
    root = make_ade20k(tmp_path / "ade", train=3, val=0)
    annotation = root / "annotations" / "training" / "ADE_train_00000002.png"
    Image.fromarray(np.ones((10, 12), np.uint8)).save(annotation)  # the image is 20 x 14
    _, result = _extract(root, tmp_path / "stores", encoder_cache("dinov2"), split="train")
    (skipped,) = result["stores"][0]["skipped"]
    assert skipped["id"] == "images/training/ADE_train_00000002.jpg"
    assert str(annotation) in skipped["reason"]
    assert "12x10" in skipped["reason"] and "20x14" in skipped["reason"]


# ---- JSON nested 200,000 levels deep --------------------------------------------------------


def _deep_llava(tmp_path) -> tuple[Path, Path]:  # (--data, the deep file)
    file = tmp_path / "llava" / "data.json"
    file.parent.mkdir()
    file.write_text(DEEP)
    return file, file


def _deep_inat(tmp_path) -> tuple[Path, Path]:  # (--data, the deep file)
    root, _ = make_inat2021(tmp_path / "inat")
    (root / "train.json").write_text(DEEP)
    return root, root / "train.json"


def _deep_fmow(tmp_path) -> tuple[Path, Path]:  # (--data, the deep file)
    root, written = make_fmow(tmp_path / "fmow")
    file = root / (sorted(written)[0][: -len(".jpg")] + ".json")
    file.write_text(DEEP)
    return root, file


def _deep_jsonl(tmp_path) -> tuple[Path, Path]:  # (--data, the deep file)
    file = tmp_path / "manifest.jsonl"
    file.write_text(json.dumps({"path": "a.png"}) + "\n" + DEEP + "\n")
    return file, file


DEEP_FILES = {"llava": _deep_llava, "inat": _deep_inat, "fmow": _deep_fmow, "jsonl": _deep_jsonl}


@pytest.mark.parametrize("layout", DEEP_FILES)
def test_deeply_nested_json_is_a_one_line_error_naming_the_file(tmp_path, layout):
    data, file = DEEP_FILES[layout](tmp_path)
    message = _error(data)
    assert str(file) in message and "nested" in message


def test_extract_cli_names_a_deeply_nested_llava_json(tmp_path):
    _, file = _deep_llava(tmp_path)
    line = _cli_error(_extract_cli(file, tmp_path / "out"))
    assert str(file) in line and "nested" in line


def test_deeply_nested_json_of_a_tar_sample_names_the_sample(tmp_path):
    shard = tmp_path / "shards" / "000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, content in (("a.jpg", IMAGES[0][1]), ("a.json", DEEP.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    message = _error(str(shard))
    assert str(shard) in message and "'a'" in message and "nested" in message


def test_deeply_nested_parquet_metadata_is_ignored_like_malformed_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    binary = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([pa.field("image", binary), pa.field("label", pa.int64())],
                       {b"huggingface": DEEP.encode()})  # fmt: skip
    rows = [{"bytes": data, "path": None} for _, data, _ in IMAGES]
    table = pa.table({"image": rows, "label": [0, 1, 1]}, schema=schema)
    pq.write_table(table, tmp_path / "train.parquet")
    assert load_dataset(tmp_path / "train.parquet").classes == ("0", "1")


# ---- fMoW boxes that are not finite numbers -------------------------------------------------


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_fmow_box_with_a_non_finite_number_names_file_and_value(tmp_path, value):
    root, written = make_fmow(tmp_path / "fmow")
    rid = sorted(written)[0]
    file = root / (rid[: -len(".jpg")] + ".json")
    meta = json.loads(file.read_text())
    meta["bounding_boxes"][0]["box"][0] = "__VALUE__"  # x: w and h are checked > 0
    file.write_text(json.dumps(meta).replace('"__VALUE__"', value))
    message = _error(root)
    shown = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}[value]
    assert str(file) in message and shown in message


def test_extract_cli_names_an_fmow_box_with_nan(tmp_path):
    root, written = make_fmow(tmp_path / "fmow")
    file = root / (sorted(written)[0][: -len(".jpg")] + ".json")
    meta = json.loads(file.read_text())
    meta["bounding_boxes"][0]["box"][0] = "__VALUE__"
    file.write_text(json.dumps(meta).replace('"__VALUE__"', "NaN"))
    line = _cli_error(_extract_cli(root, tmp_path / "out"))
    assert str(file) in line and "nan" in line


# ---- text files that are not UTF-8 ----------------------------------------------------------


@pytest.mark.parametrize("name", ["images_variant_train.txt", "variants.txt", "images_box.txt"])
def test_aircraft_list_with_bad_utf8_names_file_and_line(tmp_path, name):
    root, _ = make_aircraft(tmp_path / "aircraft")
    file = root / "data" / name
    lines = file.read_bytes().splitlines(keepends=True)
    lines.insert(1, b"0000042 Boeing \xff\xfe 737\n")
    file.write_bytes(b"".join(lines))
    message = _error(root, crop="box")
    assert str(file) in message and "line 2" in message and "UTF-8" in message
    assert "\\xff" in message


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_with_bad_utf8_names_file_and_line(tmp_path, suffix):
    _png(tmp_path / "a.png")
    file = tmp_path / f"manifest{suffix}"
    first = b"path,label\na.png,cat\n" if suffix == ".csv" else b'{"path": "a.png"}\n'
    file.write_bytes(first + b"b\xff.png,dog\n")
    message = _error(file)
    assert str(file) in message and "UTF-8" in message and "\\xff" in message
    assert f"line {3 if suffix == '.csv' else 2}" in message


# ---- brace patterns -------------------------------------------------------------------------


def test_a_brace_pattern_of_10_to_the_8_shards_is_refused_at_once(tmp_path):
    """Run in a child limited to 2 GiB of address space: expanding the pattern dies of
    MemoryError there instead of exhausting the machine. Timed and traced on a second call,
    the first having imported what loading needs."""
    pattern = str(tmp_path / "{000000000..099999999}.tar")
    code = (
        "import resource, sys, time, tracemalloc\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from featcache.datasets import ManifestError, load_dataset\n"
        "try:\n"
        "    load_dataset(sys.argv[1])\n"
        "except ManifestError:\n"
        "    pass\n"
        "tracemalloc.start(); started = time.perf_counter()\n"
        "try:\n"
        "    load_dataset(sys.argv[1])\n"
        "except ManifestError as err:\n"
        "    print(time.perf_counter() - started, tracemalloc.get_traced_memory()[1])\n"
        "    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, pattern], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    timing, message = done.stdout.splitlines()
    seconds, peak = timing.split()
    assert float(seconds) < 1.0 and int(peak) < 1 << 20
    assert pattern in message and "100000000" in message and "1000000" in message


# ---- decode memory --------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's VmHWM")
def test_a_16_bit_png_decodes_in_bounded_memory(tmp_path):
    """A 3000 x 3000 16-bit PNG (a few kB): decoding may hold the 16-bit image, its 8-bit copy
    and the RGB image (6 bytes a pixel), never float64 copies of it (20 bytes a pixel today)."""
    side = 3000
    pixels = np.zeros((side, side), np.uint16)
    pixels[::7, ::5] = 40000
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    code = (
        "import sys\n"
        "from featcache.images import decode_image\n"
        "def peak():  # kB; ru_maxrss would keep the forking parent's peak\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(status.split('VmHWM:')[1].split()[0])\n"
        "before = peak()\n"
        "image = decode_image(sys.argv[1])\n"
        "print(image.mode, image.size[0], image.size[1], (peak() - before) * 1024)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    mode, width, height, grown = done.stdout.split()
    assert (mode, int(width), int(height)) == ("RGB", side, side)
    assert int(grown) < 6 * side * side, f"{int(grown) / side / side:.1f} bytes per pixel"


def test_16_bit_scaling_is_unchanged_by_strips():
    """Every 16-bit value maps to round(v * 255 / 65535), as before, whatever strip it is in."""
    from featcache.images import decode_image

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    expected = np.rint(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], expected)
