"""Corpus formats: LLaVA-1.5 JSON, webdataset tar shards (local and s3://), Hugging Face
parquet. Each is generated from one set of JPEGs (tests/dataset_layouts.py) and its extraction
must equal the class folder's of the same bytes, row for row, after a resume."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from dataset_layouts import (
    CORPUS_CLASSES,
    corpus_images,
    make_hf_parquet,
    make_llava,
    make_wds,
    write_class_folder,
)
from test_datasets_paper import _error, _extract, _rows

from featcache.datasets import DataOptions, load_dataset
from featcache.datasets.wds import expand_braces

IMAGES = corpus_images(7)
NAMES = {name: CORPUS_CLASSES[label] for name, _, label in IMAGES}


@pytest.fixture(scope="module")
def folder_rows(tmp_path_factory, encoder_cache):
    """name -> layer-1 row of the class-folder store of IMAGES (the reference)."""
    base = tmp_path_factory.mktemp("folder")
    root = write_class_folder(base / "images", IMAGES)
    plan, _ = _extract(root, base / "stores", encoder_cache("dinov2"), split="train")
    return {Path(rid).stem: row for rid, row in _rows(plan.urls[0]).items()}


def _equal_after_resume(data, tmp_path, encoder, folder_rows, name_of, options=None):
    """Extract shard 1 only (``--shard 1/3``: as far as an interrupted run got), then all
    shards (a resume); compare with the folder."""
    out = tmp_path / "stores"
    plan, _ = _extract(data, out, encoder, split="train", options=options, shard=(1, 3))
    assert len(set(_rows(plan.urls[0])) - {""}) == 3
    plan, result = _extract(data, out, encoder, split="train", options=options)
    assert result["shards_processed"] == 2  # shards 0 and 2 of 7 images in shards of 3
    rows = _rows(plan.urls[0])
    assert len(rows) == len(IMAGES)
    for rid, row in rows.items():
        np.testing.assert_array_equal(row, folder_rows[name_of(rid)], err_msg=rid)
    return plan, result


# ---- LLaVA-1.5 JSON -------------------------------------------------------------------------


def test_llava_json_lists_each_image_once_without_labels(tmp_path):
    file = make_llava(tmp_path / "llava", IMAGES)
    data = load_dataset(file)
    assert data.format == "llava-json" and data.classes == () and data.splits() == ["train"]
    assert len(data.records) == len(IMAGES)  # the duplicate and the text-only record dropped
    assert {r.label for r in data.records} == {-1}
    assert all(r.id.startswith(("coco/train2017/", "gqa/images/")) for r in data.records)
    moved = tmp_path / "elsewhere.json"
    moved.write_text(file.read_text())
    elsewhere = load_dataset(moved, options=DataOptions(image_root=str(file.parent)))
    assert elsewhere.manifest_hash("train") == data.manifest_hash("train")


@pytest.mark.parametrize("image", ["../outside.jpg", "/etc/passwd", "coco/../../x.jpg"])
def test_llava_record_pointing_outside_the_root_is_refused(tmp_path, image):
    file = make_llava(tmp_path / "llava", IMAGES[:2])
    entries = json.loads(file.read_text())
    entries.insert(1, {"id": "bad", "image": image})
    file.write_text(json.dumps(entries))
    message = _error(file)
    assert f"record 1 of {file}" in message and repr(image) in message


def test_llava_symlink_out_of_the_root_is_refused(tmp_path):
    file = make_llava(tmp_path / "llava", IMAGES[:2])
    (tmp_path / "secret.jpg").write_bytes(IMAGES[0][1])
    (file.parent / "coco" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    entries = json.loads(file.read_text()) + [{"image": "coco/link.jpg"}]
    file.write_text(json.dumps(entries))
    assert "resolves to" in _error(file) and str(tmp_path / "secret.jpg") in _error(file)


def test_llava_extraction_equals_the_folder(tmp_path, encoder_cache, folder_rows):
    file = make_llava(tmp_path / "llava", IMAGES)
    _equal_after_resume(file, tmp_path, encoder_cache("dinov2"), folder_rows,
                        lambda rid: Path(rid).stem)  # fmt: skip


# ---- webdataset tar shards ------------------------------------------------------------------


def test_brace_expansion_keeps_padding_and_multiplies():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{train,val}/{0..1}.tar") == [
        "train/0.tar", "train/1.tar", "val/0.tar", "val/1.tar"
    ]  # fmt: skip
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("label", ["cls", "json"])
def test_tar_samples_have_shard_key_ids_and_labels(tmp_path, label):
    make_wds(tmp_path / "shards", IMAGES, label=label)
    data = load_dataset(str(tmp_path / "shards" / "{000000..000002}.tar"))
    assert data.format == "webdataset" and data.classes == ("0", "1", "2")
    assert [r.id for r in data.records] == [
        f"{i // 3:06d}/{name}" for i, (name, _, _) in enumerate(IMAGES)
    ]
    assert [r.label for r in data.records] == [label for _, _, label in IMAGES]
    assert data.records[0].decode().size == (30, 22)
    globbed = load_dataset(str(tmp_path / "shards" / "*.tar"))
    assert globbed.records == data.records
    assert globbed.manifest_hash("train") == data.manifest_hash("train")


def test_tar_split_folders_and_a_missing_shard(tmp_path):
    make_wds(tmp_path / "c" / "train", IMAGES[:4])
    make_wds(tmp_path / "c" / "val", IMAGES[4:], per_shard=2)
    data = load_dataset(str(tmp_path / "c" / "{train,val}/{000000..000001}.tar"))
    assert data.splits() == ["train", "val"] and len(data.split("val")) == 3
    assert data.split("val")[0].id == "val/000000/" + IMAGES[4][0]
    message = _error(str(tmp_path / "c" / "train" / "{000000..000004}.tar"))
    assert str(tmp_path / "c" / "train" / "000002.tar") in message and "(and 2 more)" in message


def test_tar_extraction_equals_the_folder_and_records_a_corrupt_member(
    tmp_path, encoder_cache, folder_rows
):
    shards = make_wds(tmp_path / "shards", IMAGES)
    pattern = str(tmp_path / "shards" / "{000000..000002}.tar")
    _equal_after_resume(pattern, tmp_path, encoder_cache("dinov2"), folder_rows,
                        lambda rid: rid.split("/")[1])  # fmt: skip
    # a corrupt image inside a tar: its bytes overwritten in place, same size
    with tarfile.open(shards[1]) as tar:
        member = tar.getmember(f"{IMAGES[4][0]}.jpg")
    raw = bytearray(shards[1].read_bytes())
    raw[member.offset_data : member.offset_data + member.size] = b"\0" * member.size
    shards[1].write_bytes(bytes(raw))
    _, result = _extract(pattern, tmp_path / "again", encoder_cache("dinov2"), split="train")
    (skipped,) = result["stores"][0]["skipped"]
    assert skipped["id"] == f"000001/{IMAGES[4][0]}" and "not an image" in skipped["reason"]


def test_s3_shards_are_listed_once_and_extract_like_local(
    s3_bucket, tmp_path, encoder_cache, folder_rows, monkeypatch
):
    import s3fs

    fs = s3fs.S3FileSystem()
    for shard in make_wds(tmp_path / "shards", IMAGES):
        fs.put(str(shard), f"{s3_bucket}/laion/part/{shard.name}")
    calls = []
    find = s3fs.S3FileSystem.find
    monkeypatch.setattr(
        s3fs.S3FileSystem, "find", lambda self, path, *a, **k: calls.append(path) or find(
            self, path, *a, **k)
    )  # fmt: skip
    pattern = f"s3://{s3_bucket}/laion/part/{{000000..000002}}.tar"
    data = load_dataset(pattern)
    assert calls == [f"{s3_bucket}/laion/part"]
    assert [r.id for r in data.records][:2] == [f"000000/{IMAGES[0][0]}", f"000000/{IMAGES[1][0]}"]
    plan, _ = _extract(pattern, tmp_path / "stores", encoder_cache("dinov2"), split="train")
    for rid, row in _rows(plan.urls[0]).items():
        np.testing.assert_array_equal(row, folder_rows[rid.split("/")[1]], err_msg=rid)


# ---- Hugging Face parquet -------------------------------------------------------------------


def test_parquet_classes_from_features_and_ids_by_row(tmp_path):
    root = make_hf_parquet(tmp_path / "hub", IMAGES)
    data = load_dataset(root)
    assert data.format == "hf-parquet" and data.classes == CORPUS_CLASSES
    assert data.splits() == ["train"]
    assert sorted(r.id for r in data.records) == sorted(
        [f"data/train-00000-of-00002.parquet/{i}" for i in range(4)]
        + [f"data/train-00001-of-00002.parquet/{i}" for i in range(3)]
    )
    assert [r.label for r in data.records if r.id.startswith("data/train-00000")] == [0, 1, 2, 0]
    glob = load_dataset(str(root / "data" / "train-*.parquet"))
    assert [r.label for r in glob.records] == [r.label for r in data.records]
    assert "--image-column 'picture'" in _error(root, image_column="picture")
    assert "--image-column only with data it applies to" in _error(
        make_llava(tmp_path / "l", IMAGES[:1]), image_column="image"
    )


def test_parquet_extraction_equals_the_folder_and_records_a_row_without_bytes(
    tmp_path, encoder_cache, folder_rows
):
    import pyarrow.parquet as pq

    root = make_hf_parquet(tmp_path / "hub", IMAGES)
    order = {f"data/train-{i // 4:05d}-of-00002.parquet/{i % 4}": name
             for i, (name, _, _) in enumerate(IMAGES)}  # fmt: skip
    _equal_after_resume(root, tmp_path, encoder_cache("dinov2"), folder_rows, order.get)
    file = root / "data" / "train-00001-of-00002.parquet"
    table = pq.read_table(file)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": None, "path": "lost.jpg"}
    table = table.set_column(0, table.schema.field("image"), [images])
    pq.write_table(table, file, row_group_size=2)
    _, result = _extract(root, tmp_path / "again", encoder_cache("dinov2"), split="train")
    (skipped,) = result["stores"][0]["skipped"]
    assert skipped["id"] == "data/train-00001-of-00002.parquet/1"
    assert "no image bytes (path 'lost.jpg' only)" in skipped["reason"]


def test_describe_and_extract_options_reach_the_corpus_readers(tmp_path):
    from typer.testing import CliRunner

    from cli.featcache_app import app

    runner = CliRunner()
    root = make_hf_parquet(tmp_path / "hub", IMAGES)
    result = runner.invoke(app, ["dataset", "describe", str(root), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "hf-parquet" and summary["classes"] == list(CORPUS_CLASSES)
    assert summary["splits"]["train"]["images"] == len(IMAGES)
    result = runner.invoke(app, ["dataset", "describe", str(root), "--label-column", "nope"])
    assert result.exit_code == 2 and "--label-column 'nope'" in result.output
    file = make_llava(tmp_path / "llava", IMAGES[:2])
    moved = tmp_path / "meta" / "data.json"
    moved.parent.mkdir()
    moved.write_text(file.read_text())
    result = runner.invoke(
        app, ["dataset", "describe", str(moved), "--image-root", str(file.parent), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["splits"]["train"]["images"] == 2


def test_parquet_conversion_layout_takes_splits_from_folders(tmp_path):
    """The hub's parquet conversion: ``<config>/<split>/0000.parquet``."""
    root = make_hf_parquet(tmp_path / "made", IMAGES, files=2)
    hub = tmp_path / "hub"
    for i, split in enumerate(("train", "test")):
        (hub / "default" / split).mkdir(parents=True)
        source = root / "data" / f"train-{i:05d}-of-00002.parquet"
        (hub / "default" / split / "0000.parquet").write_bytes(source.read_bytes())
    data = load_dataset(hub)
    assert data.splits() == ["test", "train"] and len(data.split("test")) == 3
    assert data.split("test")[0].id == "default/test/0000.parquet/0"
