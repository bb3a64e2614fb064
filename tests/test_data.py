"""Loading datasets: class folders, split folders, CSV / JSONL manifests, and their errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from featcache.datasets import Dataset, ManifestError, MaskLabels, Record, load_dataset
from featcache.demo_data import make_demo_dataset
from featcache.errors import FeatcacheError


def _png(path, value: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path)
    return path


def _csv(path, rows, header=("path", "label", "split", "mask")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _jsonl(path, lines):
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    )
    return path


def _error(source) -> str:
    with pytest.raises(ManifestError) as info:
        load_dataset(source)
    return str(info.value)


def test_manifest_error_is_a_featcache_value_error():
    assert issubclass(ManifestError, FeatcacheError) and issubclass(ManifestError, ValueError)


# ---- image folders ------------------------------------------------------------------------


def test_class_folders_give_sorted_labels_and_recursive_images(tmp_path):
    _png(tmp_path / "dog" / "d1.png")
    _png(tmp_path / "cat" / "c1.png")
    _png(tmp_path / "cat" / "deeper" / "c2.JPG")
    _png(tmp_path / "cat" / ".hidden.png")
    _png(tmp_path / ".cache" / "x.png")
    _png(tmp_path / "empty_class" / ".keep.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("top-level files are ignored")

    data = load_dataset(tmp_path)
    assert data.source == data.root == str(tmp_path)
    assert data.classes == ("cat", "dog", "empty_class")
    assert [(r.id, r.label, r.split, r.mask) for r in data.records] == [
        ("cat/c1.png", 0, "train", None),
        ("cat/deeper/c2.JPG", 0, "train", None),
        ("dog/d1.png", 1, "train", None),
    ]
    assert all(os.path.isabs(r.path) and os.path.isfile(r.path) for r in data.records)
    assert data.splits() == ["train"] and not data.has_masks("train")


def test_split_folders_share_one_class_list(tmp_path):
    _png(tmp_path / "train" / "cat" / "a.png")
    _png(tmp_path / "train" / "dog" / "b.png")
    _png(tmp_path / "val" / "dog" / "c.png")
    _png(tmp_path / "val" / "eel" / "d.png")

    data = load_dataset(tmp_path)
    assert data.classes == ("cat", "dog", "eel")
    assert data.splits() == ["train", "val"]
    assert [(r.id, r.label) for r in data.split("train")] == [
        ("train/cat/a.png", 0),
        ("train/dog/b.png", 1),
    ]
    assert [(r.id, r.label) for r in data.split("val")] == [
        ("val/dog/c.png", 1),
        ("val/eel/d.png", 2),
    ]


def test_folders_that_are_not_all_split_names_are_classes(tmp_path):
    _png(tmp_path / "train" / "a.png")
    _png(tmp_path / "zebra" / "b.png")
    data = load_dataset(tmp_path)
    assert data.classes == ("train", "zebra") and data.splits() == ["train"]


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("x")
    message = _error(tmp_path)
    assert str(tmp_path) in message and "Got none" in message


# ---- manifests ----------------------------------------------------------------------------


def test_csv_manifest_with_relative_paths_and_masks(tmp_path):
    manifest = _csv(
        tmp_path / "m.csv",
        [
            ("./imgs/b.png", "dog", "train", "masks/b.png"),
            ("imgs/sub/../a.png", "cat", "train", "masks/a.png"),
            ("imgs/c.png", "dog", "test", ""),
        ],
    )
    data = load_dataset(manifest)  # the files need not exist yet
    assert data.source == str(manifest) and data.root == str(tmp_path)
    assert data.classes == ("cat", "dog")
    assert [r.id for r in data.records] == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
    a = data.split("train")[0]
    assert a == Record(
        "imgs/a.png",
        str(tmp_path / "imgs" / "a.png"),
        0,
        "train",
        str(tmp_path / "masks" / "a.png"),
    )
    assert data.has_masks("train") and not data.has_masks("test")
    assert data.split("test")[0].mask is None


def test_jsonl_manifest_integer_labels_default_split_extra_keys(tmp_path):
    manifest = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"path": "x/1.png", "label": 3, "caption": "ignored"},
            "",
            {"path": "x/0.png", "label": "0", "split": "val"},
        ],
    )
    data = load_dataset(manifest)
    assert data.classes == ("0", "1", "2", "3")
    assert [(r.id, r.label, r.split) for r in data.records] == [
        ("x/0.png", 0, "val"),
        ("x/1.png", 3, "train"),
    ]


def test_manifest_without_label_column(tmp_path):
    data = load_dataset(_csv(tmp_path / "m.csv", [("a.png",), ("b.png",)], header=("path",)))
    assert data.classes == () and [r.label for r in data.records] == [-1, -1]


def test_class_name_labels_map_by_sorted_name(tmp_path):
    rows = [("1.png", "zebra"), ("2.png", "ant"), ("3.png", "moth"), ("4.png", "ant")]
    data = load_dataset(_csv(tmp_path / "m.csv", rows, header=("path", "label")))
    assert data.classes == ("ant", "moth", "zebra")
    assert {r.id: r.label for r in data.records} == {"1.png": 2, "2.png": 0, "3.png": 1, "4.png": 0}


def test_demo_manifest_and_image_folder_agree(tmp_path):
    manifest = make_demo_dataset(tmp_path, per_class=4)
    from_manifest = load_dataset(manifest)
    from_folder = load_dataset(tmp_path / "images")
    assert from_manifest.classes == from_folder.classes
    assert from_manifest.splits() == ["test", "train"] and from_folder.splits() == ["train"]
    assert from_manifest.has_masks("train") and not from_folder.has_masks("train")
    # the folder form has no split column: its "train" holds every image of the manifest
    every = {(r.id.removeprefix("images/"), r.label) for r in from_manifest.records}
    assert {(r.id, r.label) for r in from_folder.split("train")} == every
    train = {(r.id.removeprefix("images/"), r.label) for r in from_manifest.split("train")}
    assert train < every and all(os.path.isfile(r.mask) for r in from_manifest.records)


# ---- manifest errors ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x.png", "/etc/passwd", "a/../../x.png", "C:\\x.png"])
@pytest.mark.parametrize("column", ["path", "mask"])
def test_paths_escaping_the_data_root_are_rejected(tmp_path, bad, column):
    row = (bad, "cat", "train", "m.png") if column == "path" else ("ok.png", "cat", "train", bad)
    manifest = _csv(tmp_path / "m.csv", [("fine.png", "cat", "train", "m0.png"), row])
    message = _error(manifest)
    assert f"line 3 of {manifest}" in message and repr(bad) in message and column in message


def test_duplicate_rows_name_both_lines(tmp_path):
    manifest = _csv(
        tmp_path / "m.csv", [("a.png", 0), ("b.png", 1), ("./a.png", 0)], ("path", "label")
    )
    message = _error(manifest)
    assert str(manifest) in message and "line 2" in message and "line 4" in message
    assert "'a.png'" in message


@pytest.mark.parametrize(
    "labels, line, value, reason",
    [
        (["0", "1", "cat"], 4, "'cat'", "mixed"),
        (["dog", "cat", "7"], 4, "'7'", "mixed"),
        (["0", "2.5", "1"], 3, "'2.5'", "whole number"),
        (["0", "-1", "1"], 3, "'-1'", "negative"),
        (["cat", "", "dog"], 3, "''", "empty"),
    ],
)
def test_bad_labels_name_file_line_value(tmp_path, labels, line, value, reason):
    rows = [(f"{i}.png", label) for i, label in enumerate(labels)]
    manifest = _csv(tmp_path / "m.csv", rows, header=("path", "label"))
    message = _error(manifest)
    assert f"line {line} of {manifest}" in message and value in message and reason in message
    assert "integers >= 0" in message and "class names" in message


def test_bad_jsonl_labels(tmp_path):
    manifest = _jsonl(
        tmp_path / "m.jsonl", [{"path": "a.png", "label": 1}, {"path": "b.png", "label": 1.5}]
    )
    message = _error(manifest)
    assert f"line 2 of {manifest}" in message and "1.5" in message


def test_some_but_not_all_masks_in_a_split(tmp_path):
    manifest = _csv(
        tmp_path / "m.csv", [("a.png", 0, "train", "ma.png"), ("b.png", 0, "train", "")]
    )
    message = _error(manifest)
    assert f"line 3 of {manifest}" in message and "'train'" in message and "mask" in message


def test_missing_path_column(tmp_path):
    manifest = _csv(tmp_path / "m.csv", [("a.png", 0)], header=("file", "label"))
    message = _error(manifest)
    assert str(manifest) in message and "'path'" in message and "['file', 'label']" in message
    jsonl = _jsonl(tmp_path / "m.jsonl", [{"path": "a.png"}, {"image": "b.png", "label": 0}])
    message = _error(jsonl)
    assert f"line 2 of {jsonl}" in message and "['image', 'label']" in message


def test_unsupported_or_missing_data_path(tmp_path):
    message = _error(tmp_path / "data.parquet")
    assert "data.parquet" in message and ".csv" in message and ".jsonl" in message
    assert "directory" in message
    assert "does not exist" in _error(tmp_path / "nope.csv")


def test_unknown_split_lists_the_splits_present(tmp_path):
    data = load_dataset(
        _csv(tmp_path / "m.csv", [("a.png", 0, "train", ""), ("b.png", 1, "test", "")])
    )
    with pytest.raises(ManifestError) as info:
        data.split("val")
    assert "'val'" in str(info.value) and "'test', 'train'" in str(info.value)


# ---- order and hash -----------------------------------------------------------------------


def _numbered(tmp_path, count=20) -> Dataset:
    rows = [(f"img_{i:02d}.png", i % 3, "train", f"mask_{i:02d}.png") for i in range(count)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_dataset(_csv(tmp_path / "m.csv", rows))


def test_seeded_order_is_stable_and_a_permutation(tmp_path):
    data = _numbered(tmp_path)
    first = data.ordered("train", seed=7)
    assert first == data.ordered("train", seed=7) == load_dataset(data.source).ordered("train", 7)
    assert sorted(first, key=lambda r: r.id) == data.split("train")
    assert first != data.split("train") and first != data.ordered("train", seed=8)
    expected = np.random.default_rng(7).permutation(20)
    assert [r.id for r in first] == [f"img_{i:02d}.png" for i in expected]


def test_manifest_hash_survives_a_move_and_tracks_content(tmp_path):
    _numbered(tmp_path / "a")  # writes a/m.csv
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "b")
    original = load_dataset(tmp_path / "a" / "m.csv").manifest_hash("train")
    assert len(original) == 32 and int(original, 16) >= 0
    assert load_dataset(tmp_path / "moved" / "b" / "m.csv").manifest_hash("train") == original

    lines = (tmp_path / "a" / "m.csv").read_text().splitlines()
    lines[5] = lines[5].replace(",1,train,", ",2,train,")
    assert lines[5] != (tmp_path / "moved" / "b" / "m.csv").read_text().splitlines()[5]
    (tmp_path / "a" / "m.csv").write_text("\n".join(lines) + "\n")
    relabelled = load_dataset(tmp_path / "a" / "m.csv").manifest_hash("train")
    assert relabelled != original

    lines[5] = lines[5].replace("mask_04.png", "other_mask.png")
    (tmp_path / "a" / "m.csv").write_text("\n".join(lines) + "\n")
    assert load_dataset(tmp_path / "a" / "m.csv").manifest_hash("train") not in (
        original,
        relabelled,
    )


def test_folder_hash_survives_a_move(tmp_path):
    _png(tmp_path / "a" / "cat" / "1.png")
    _png(tmp_path / "a" / "dog" / "2.png")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert load_dataset(tmp_path / "a").manifest_hash("train") == load_dataset(
        tmp_path / "b"
    ).manifest_hash("train")


@pytest.mark.parametrize("bad", ["not json", "[1, 2]"])
def test_jsonl_lines_that_are_not_objects(tmp_path, bad):
    manifest = _jsonl(tmp_path / "m.jsonl", [{"path": "a.png"}, "", bad])
    message = _error(manifest)
    assert f"line 3 of {manifest}" in message and "JSON object" in message


@pytest.mark.parametrize("bad", ["", ".", "sub/.."])
def test_empty_path_or_the_root_itself_is_rejected(tmp_path, bad):
    manifest = _csv(tmp_path / "m.csv", [("a.png", 0), (bad, 1)], header=("path", "label"))
    assert f"line 3 of {manifest}" in _error(manifest)


# ---- mask labels --------------------------------------------------------------------------


def test_manifest_masks_are_not_reduced_unless_asked(tmp_path):
    rows = [
        ("a.png", 0, "train", "ma.png"),
        ("b.png", 1, "train", "mb.png"),
        ("c.png", 1, "test", ""),
    ]
    manifest = _csv(tmp_path / "m.csv", rows)
    default = load_dataset(manifest)
    assert default.mask_labels == MaskLabels(reduce_zero_label=False, ignore_value=255)
    assert load_dataset(manifest, reduce_zero_label=None).mask_labels == default.mask_labels
    reduced = load_dataset(manifest, reduce_zero_label=True)
    assert reduced.mask_labels == MaskLabels(reduce_zero_label=True, ignore_value=255)
    assert reduced.classes == default.classes == ("0", "1")  # image labels, not mask classes
    # the option is part of the masked split's identity, and of nothing else
    assert reduced.manifest_hash("train") != default.manifest_hash("train")
    assert reduced.manifest_hash("test") == default.manifest_hash("test")
    assert load_dataset(manifest, reduce_zero_label=True).manifest_hash("train") == (
        reduced.manifest_hash("train")
    )


def test_datasets_without_masks_keep_their_hash_under_either_option(tmp_path):
    _png(tmp_path / "cat" / "1.png")
    _png(tmp_path / "dog" / "2.png")
    plain = load_dataset(tmp_path)
    assert plain.mask_labels == MaskLabels() and not plain.has_masks("train")
    rows = [[r.id, r.label, None] for r in plain.split("train")]
    text = json.dumps({"classes": list(plain.classes), "records": rows}, separators=(",", ":"))
    expected = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]  # the original formula
    assert plain.manifest_hash("train") == expected
    assert load_dataset(tmp_path, reduce_zero_label=True).manifest_hash("train") == expected


def test_a_dataset_built_by_hand_gets_the_default_mask_labels(tmp_path):
    record = Record("a.png", str(tmp_path / "a.png"), -1, "train", str(tmp_path / "m.png"))
    data = Dataset(str(tmp_path), str(tmp_path), (), (record,))
    assert data.mask_labels == MaskLabels()
