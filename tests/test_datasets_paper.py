"""The paper's datasets (fMoW-RGB, iNaturalist 2021, FGVC-Aircraft) in their published layouts,
class-balanced subsets, and ``featcache dataset describe``; data from tests/dataset_layouts.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from dataset_layouts import (
    AIRCRAFT,
    FMOW_CATEGORIES,
    INAT_SPECIES,
    make_aircraft,
    make_fmow,
    make_inat2021,
)
from PIL import Image
from typer.testing import CliRunner

from cli.featcache_app import app
from featcache.datasets import DataOptions, ManifestError, load_dataset
from featcache.errors import BadImageError
from featcache.images import decode_image

runner = CliRunner()


def _error(source, **options) -> str:
    with pytest.raises(ManifestError) as info:
        load_dataset(source, options=DataOptions(**options))
    message = str(info.value)
    assert "\n" not in message
    return message


def _extract(data, out, encoder, *, split, options=None, shards=None, **config):
    """One store of ``encoder`` (layer 1), batch 1 so rows do not depend on batch company;
    ``config``: more ExtractConfig fields."""
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    config = ExtractConfig(
        models=[encoder.name],
        data=str(data),
        out=str(out),
        layers=[1],
        split=split,
        batch_size=1,
        shard_size=3,
        on_bad_image="skip",
        data_options=options,
        **config,
    )
    plan = plan_extraction(config, encoders=[encoder])
    return plan, run_extraction(plan, shards=shards)


def _rows(url) -> dict[str, np.ndarray]:
    from featcache.store import FeatureStore

    store = FeatureStore.open(url)
    return dict(zip(store.read("ids"), store.read("layers/1"), strict=True))


# ---- fMoW-RGB ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmow(tmp_path_factory):
    return make_fmow(tmp_path_factory.mktemp("fmow") / "fmow-rgb")


def test_fmow_layout_gives_categories_splits_and_object_boxes(fmow):
    root, written = fmow
    data = load_dataset(root)
    assert data.format == "fmow-rgb" and data.classes == FMOW_CATEGORIES
    assert data.splits() == ["train", "val"]  # test/ and seq/ have no categories
    assert sorted(r.id for r in data.records) == sorted(written)
    for record in data.records:
        category, split, (x, y, w, h) = written[record.id]
        assert (data.classes[record.label], record.split) == (category, split)
        assert record.box == (x, y, x + w, y + h)
    whole = load_dataset(root, options=DataOptions(crop="whole"))
    assert all(r.box is None for r in whole.records)
    assert [r.id for r in whole.records] == [r.id for r in data.records]
    assert whole.manifest_hash("train") != data.manifest_hash("train")
    assert load_dataset(root).manifest_hash("train") == data.manifest_hash("train")


def test_fmow_box_crop_decodes_the_annotated_pixels(fmow):
    root, written = fmow
    record = load_dataset(root).split("val")[0]
    x, y, w, h = written[record.id][2]
    full = np.asarray(decode_image(record.path))
    np.testing.assert_array_equal(np.asarray(record.decode()), full[y : y + h, x : x + w])


def _copy_fmow(fmow, tmp_path) -> Path:
    root = tmp_path / "fmow-rgb"
    for rid in fmow[1]:
        for suffix in (".jpg", ".json"):
            source = (fmow[0] / rid).with_suffix(suffix)
            (root / rid).parent.mkdir(parents=True, exist_ok=True)
            (root / rid).with_suffix(suffix).write_bytes(source.read_bytes())
    return root


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "No such file"),
        ("not json", "Expecting value"),
        ("no box", "0 bounding_boxes"),
        ("zero width", "box [1, 2, 0, 5]"),
    ],
)
def test_fmow_bad_metadata_names_the_file(fmow, tmp_path, case, expected):
    root = _copy_fmow(fmow, tmp_path)
    meta = root / "train" / "port" / "port_1" / "port_1_0_rgb.json"
    if case == "missing":
        meta.unlink()
    elif case == "not json":
        meta.write_text("not json")
    else:
        boxes = [] if case == "no box" else [{"box": [1, 2, 0, 5], "category": "port"}]
        meta.write_text(json.dumps({"bounding_boxes": boxes}))
    message = _error(root)
    assert str(meta) in message and expected in message
    assert len(load_dataset(root, options=DataOptions(crop="whole")).records) == len(fmow[1])


def test_fmow_symlink_out_of_the_root_is_refused(fmow, tmp_path):
    root = _copy_fmow(fmow, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = root / "train" / "port" / "port_1"
    os.rename(link, outside / "port_1")
    os.symlink(outside / "port_1", link)
    message = _error(root, crop="whole")
    assert str(link) in message and "resolve inside the data root" in message


def test_options_that_do_not_apply_to_the_layout_are_refused(fmow, tmp_path):
    assert "--level only with data it applies to (FGVC-Aircraft)" in _error(fmow[0], level="family")
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat" / "a.png")
    assert "--crop only" in _error(tmp_path, crop="box")
    with pytest.raises(ManifestError, match="--crop box or whole or banner"):
        DataOptions(crop="boxes")


def test_fmow_extraction_equals_a_folder_of_the_cropped_images_and_resumes(
    fmow, tmp_path, encoder_cache
):
    """The crop happens at decode: a store of fMoW (box crop) equals a store of a class
    folder holding each box already cut out (lossless PNG), row for row, after a resume."""
    encoder = encoder_cache("dinov2")
    root, _ = fmow
    folder = tmp_path / "cropped"
    names = {}
    for record in load_dataset(root).split("train"):
        category = FMOW_CATEGORIES[record.label]
        target = folder / category / (Path(record.id).stem + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        record.decode().save(target)
        names[record.id] = f"{category}/{target.name}"
    plan, _ = _extract(root, tmp_path / "a", encoder, split="train", shards=[1])
    assert len(set(_rows(plan.urls[0])) - {""}) == 3  # one shard of 3 written, as if killed
    plan, result = _extract(root, tmp_path / "a", encoder, split="train")
    assert result["shards_processed"] == 4 - 1  # 12 images in shards of 3: the rest resumed
    reference, _ = _extract(folder, tmp_path / "b", encoder, split="train")
    ours, theirs = _rows(plan.urls[0]), _rows(reference.urls[0])
    assert not np.isnan(np.stack(list(ours.values()))).any()
    for rid, row in ours.items():
        np.testing.assert_array_equal(row, theirs[names[rid]], err_msg=rid)


def test_a_box_outside_the_image_is_a_recorded_skip(fmow, tmp_path, encoder_cache):
    root = _copy_fmow(fmow, tmp_path)
    meta = root / "val" / "port" / "port_0" / "port_0_0_rgb.json"
    meta.write_text(json.dumps({"bounding_boxes": [{"box": [500, 500, 4, 4], "category": "port"}]}))
    record = next(r for r in load_dataset(root).split("val") if r.id.endswith("port_0_0_rgb.jpg"))
    with pytest.raises(BadImageError, match="holds no pixel of the 40x30 image"):
        record.decode()
    _, result = _extract(root, tmp_path / "s", encoder_cache("dinov2"), split="val")
    (skipped,) = result["stores"][0]["skipped"]
    assert skipped["id"] == record.id and "crop box [500, 500, 504, 504]" in skipped["reason"]


# ---- iNaturalist 2021 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def inat(tmp_path_factory):
    return make_inat2021(tmp_path_factory.mktemp("inat") / "inat2021")


def test_inat_reads_coco_json_with_classes_by_category_id(inat):
    root, written = inat
    data = load_dataset(root)
    assert data.format == "inat2021" and data.splits() == ["train", "val"]
    assert data.classes == tuple(name for name, *_ in INAT_SPECIES)
    assert sorted(r.id for r in data.records) == sorted(written)
    for record in data.records:
        assert (data.classes[record.label], record.split) == written[record.id]


def test_inat_select_keeps_the_families_named(inat):
    root, written = inat
    chosen = ("Sphingidae", "Pieridae", "Pyralidae")
    data = load_dataset(root, options=DataOptions(select=("family", chosen)))
    kept = [s for s in INAT_SPECIES if s[5] in chosen]
    assert data.classes == tuple(s[0] for s in kept)
    assert sorted(r.id for r in data.records) == sorted(
        f for f, (name, _) in written.items() if name in data.classes
    )
    assert data.selection == {"select": {"family": sorted(chosen)}}
    order = load_dataset(root, options=DataOptions(select=("order", ("Lepidoptera",))))
    assert len(order.classes) == 5 and order.manifest_hash("train") != data.manifest_hash("train")


def test_inat_select_errors_list_what_exists(inat):
    root, _ = inat
    message = _error(root, select=("familly", ("Pieridae",)))
    assert "'familly'" in message and "family" in message and "genus" in message
    message = _error(root, select=("family", ("Pieridae", "Nope")))
    assert "'Nope'" in message and "Sphingidae" in message


def _inat_copy(inat, tmp_path) -> Path:
    root = tmp_path / "inat"
    for name in inat[1]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes((inat[0] / name).read_bytes())
    for split in ("train", "val"):
        (root / f"{split}.json").write_bytes((inat[0] / f"{split}.json").read_bytes())
    return root


@pytest.mark.parametrize(
    "change, expected",
    [
        ("escape", "outside it"),
        ("absolute", "the absolute path"),
        ("no annotation", "Got none for image"),
        ("unknown category", "an unknown category"),
    ],
)
def test_inat_bad_records_name_the_file(inat, tmp_path, change, expected):
    root = _inat_copy(inat, tmp_path)
    file = root / "val.json"
    content = json.loads(file.read_text())
    if change == "escape":
        content["images"][0]["file_name"] = "../../secret.jpg"
    elif change == "absolute":
        content["images"][0]["file_name"] = "/etc/passwd"
    elif change == "no annotation":
        content["annotations"].pop(0)
    else:
        content["annotations"][0]["category_id"] = 999
    file.write_text(json.dumps(content))
    message = _error(root)
    assert str(file) in message and expected in message


# ---- FGVC-Aircraft -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aircraft(tmp_path_factory):
    return make_aircraft(tmp_path_factory.mktemp("aircraft"))


@pytest.mark.parametrize("level, column", [("variant", 0), ("family", 1), ("manufacturer", 2)])
def test_aircraft_levels_splits_and_class_file_order(aircraft, level, column):
    root, written = aircraft
    data = load_dataset(root, options=DataOptions(level=None if column == 0 else level))
    assert data.format == "fgvc-aircraft" and data.splits() == ["test", "train", "val"]
    assert data.classes == tuple(dict.fromkeys(n[column] for n in reversed(AIRCRAFT)))
    assert sorted(r.id for r in data.records) == sorted(f"data/images/{i}.jpg" for i in written)
    for record in data.records:
        names, split, _ = written[Path(record.id).stem]
        assert (data.classes[record.label], record.split, record.box) == (
            names[column],
            split,
            None,
        )
    assert data.selection == {"level": level, "crop": "whole"}
    # the data/ folder itself is a root too (ids then lose the data/ prefix)
    assert len(load_dataset(root / "data", options=DataOptions(level=level)).records) == len(
        written
    )


def test_aircraft_box_crop_from_one_based_inclusive_boxes(aircraft):
    root, written = aircraft
    data = load_dataset(root, options=DataOptions(crop="box"))
    record = data.records[0]
    xmin, ymin, xmax, ymax = written[Path(record.id).stem][2]
    assert record.box == (xmin - 1, ymin - 1, xmax, ymax)
    full = np.asarray(decode_image(record.path))
    np.testing.assert_array_equal(
        np.asarray(record.decode()), full[ymin - 1 : ymax, xmin - 1 : xmax]
    )
    assert data.manifest_hash("train") != load_dataset(root).manifest_hash("train")


def test_aircraft_banner_crop_removes_the_bottom_20_pixels(aircraft, fmow):
    root, _ = aircraft
    data = load_dataset(root, options=DataOptions(crop="banner"))
    record = data.records[0]
    full = np.asarray(decode_image(record.path))  # 48 x 36 generated images
    assert record.box == (0, 0, 48, 16)
    np.testing.assert_array_equal(np.asarray(record.decode()), full[:16])
    assert data.selection["crop"] == "banner"
    assert "--crop box or whole for fMoW-RGB" in _error(fmow[0], crop="banner")


def test_aircraft_bad_lists_name_file_and_line(aircraft, tmp_path):
    root = tmp_path / "fgvc-aircraft-2013b"
    for path in aircraft[0].rglob("*"):
        if path.is_file():
            target = root / path.relative_to(aircraft[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    listing = root / "data" / "images_variant_test.txt"
    listing.write_text(listing.read_text() + "1234567 Concorde\n")
    message = _error(root)
    assert f"line {len(AIRCRAFT) + 1} of {listing}" in message and "'Concorde'" in message
    (root / "data" / "images_box.txt").unlink()
    assert "images_box.txt for --crop box" in _error(root, crop="box", level="family")


# ---- class-balanced subsets ----------------------------------------------------------------


def _subset(root, **options):
    return load_dataset(root, options=DataOptions(**options))


def test_split_pairs_are_drawn_disjointly_per_class_seeded_and_hashed(inat, tmp_path):
    root, _ = inat
    data = _subset(root, per_class="train=2,test=1")
    assert data.splits() == ["test", "train"] and data.classes == load_dataset(root).classes
    train, test = data.split("train"), data.split("test")
    for label in range(len(data.classes)):
        assert sum(r.label == label for r in train) == 2
        assert sum(r.label == label for r in test) == 1
    assert not {r.id for r in train} & {r.id for r in test}
    assert all(r.id.startswith("train/") for r in data.records)  # both drawn from train
    again = _subset(root, per_class="train=2,test=1")
    other = _subset(root, per_class="train=2,test=1", subset_seed=1)
    assert again.records == data.records and other.records != data.records
    hashes = {d.manifest_hash("train") for d in (data, other, load_dataset(root))}
    assert len(hashes) == 3 and again.manifest_hash("test") == data.manifest_hash("test")
    elsewhere = _subset(_inat_copy(inat, tmp_path), per_class="train=2,test=1")  # another copy
    assert [r.id for r in elsewhere.records] == [r.id for r in data.records]
    assert elsewhere.manifest_hash("train") == data.manifest_hash("train")
    assert data.selection["subset"] == {
        "per_class": {"train": 2, "test": 1},
        "from": {"train": ["train"], "test": ["train"]},
        "seed": 0,
        "dropped": [],
    }
    pooled = _subset(root, per_class="train=3,test=2", subset_from="train,val")
    assert {r.id.split("/")[0] for r in pooled.records} == {"train", "val"}


def test_per_class_n_draws_every_split_from_itself(inat):
    root, _ = inat
    one = _subset(root, per_class="1")
    assert one.splits() == ["train", "val"] and one.classes == load_dataset(root).classes
    for split in ("train", "val"):
        assert sorted(r.label for r in one.split(split)) == list(range(len(one.classes)))
        assert all(r.id.startswith(f"{split}/") for r in one.split(split))
    assert "(1 of 2)" in _error(root, per_class="2")  # val holds one image per class


def _drop_images(root: Path, split: str, species: str, count: int) -> None:
    file = root / f"{split}.json"
    content = json.loads(file.read_text())
    cid = next(c["id"] for c in content["categories"] if c["name"] == species)
    gone = [a["image_id"] for a in content["annotations"] if a["category_id"] == cid][:count]
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] not in gone]
    content["images"] = [i for i in content["images"] if i["id"] not in gone]
    file.write_text(json.dumps(content))


def test_short_classes_are_an_error_or_dropped_and_leave_other_draws_alone(inat, tmp_path):
    root, _ = inat
    before = _subset(root, per_class="train=2,test=1")
    small = _inat_copy(inat, tmp_path)
    _drop_images(small, "train", "Pieris rapae", 2)
    message = _error(small, per_class="train=2,test=1")
    assert "'Pieris rapae' (2 of 3)" in message and "--short-classes drop" in message
    after = _subset(small, per_class="train=2,test=1", short_classes="drop")
    assert "Pieris rapae" not in after.classes and len(after.classes) == len(before.classes) - 1
    assert after.selection["subset"]["dropped"] == ["Pieris rapae"]
    kept = {r.id: (before.classes[r.label], r.split) for r in before.records}
    assert {r.id: (after.classes[r.label], r.split) for r in after.records} == {
        rid: value for rid, value in kept.items() if value[0] != "Pieris rapae"
    }


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"per_class": "train=2,train=1"}, "Expected --per-class N or SPLIT=N"),
        ({"per_class": "0"}, "Expected --per-class N or SPLIT=N"),
        ({"per_class": "train=1", "subset_from": "tset"}, "Got 'tset'"),
        ({"per_class": "1", "subset_from": "train"}, "Expected --subset-from only"),
    ],
)
def test_bad_subset_options(inat, options, expected):
    assert expected in _error(inat[0], **options)


def test_describe_prints_classes_counts_and_the_subset(inat):
    root, _ = inat
    args = ["dataset", "describe", str(root), "--select", "family=Sphingidae,Pieridae"]
    result = runner.invoke(app, [*args, "--per-class", "train=3,test=2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "inat2021"
    assert summary["classes"] == ["Hyles lineata", "Manduca sexta", "Pieris rapae"]
    assert summary["splits"]["train"]["per_class"] == dict.fromkeys(summary["classes"], 4)
    subset = summary["subset"]
    assert subset["holds"] == {"train": {"images": 0, "classes": 0}, "test": {"images": 0,
                               "classes": 0}}  # fmt: skip
    assert set(subset["short_classes"]) == set(summary["classes"])  # 4 < 3 + 2
    result = runner.invoke(app, [*args, "--per-class", "train=2,test=1"])
    assert result.exit_code == 0, result.output
    assert "Manduca sexta" in result.output and "--per-class train=2,test=1" in result.output
    result = runner.invoke(app, ["dataset", "describe", str(root), "--level", "family"])
    assert result.exit_code == 2 and "error: Expected --level only" in result.output


def test_extract_cli_builds_the_subset_store(inat, tmp_path):
    from featcache.store import FeatureStore

    root, _ = inat
    options = ["--select", "family=Sphingidae,Pieridae", "--per-class", "train=2,test=1"]
    args = ["extract", "--model", "dinov2-tiny", "--data", str(root), "--layers", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path), "--split", "test", *options])
    assert result.exit_code == 0, result.output
    (url,) = tmp_path.glob("test/*.zarr")
    store = FeatureStore.open(str(url))
    expected = _subset(root, select=("family", ("Sphingidae", "Pieridae")),
                       per_class="train=2,test=1")  # fmt: skip
    assert store.attrs["dataset"]["manifest_hash"] == expected.manifest_hash("test")
    assert sorted(store.read("ids")) == [r.id for r in expected.split("test")]
    # the store records the options, so its dataset reopens as extraction read it (show, scoring)
    from featcache.datasets import reopen_dataset

    recorded = store.attrs["dataset"]
    assert recorded["options"]["per_class"] == "train=2,test=1"
    assert reopen_dataset(recorded).manifest_hash("test") == recorded["manifest_hash"]
