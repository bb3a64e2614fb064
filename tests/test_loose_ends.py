"""Loose ends of issues 21-23: ``featcache ls`` lists a store whose metadata is damaged (never
drops it) and ``info`` counts images as ``ls`` does; the report says which encoder each sweep
key stands for (a "Models" table); probe metrics and CKA results name a hybrid by its readable
label, never its ``stitched:/abs/dir`` name.

One tiny pair of one token shape (dinov2-tiny -> clip-tiny at position 2, FFM, linear stitch)
and the hybrid's stores, as in test_hybrid_uses; a class folder with two unreadable images for
the image counts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import extract_demo_stores, folder_with_unreadable_images
from test_report import write_sweep_dir
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore, StoreError
from stitchtrain.pipeline.fit import fit
from stitchtrain.scoring.probe import probe_store
from stitchtrain.studies.cka import cka_stores
from stitchtrain.studies.report.page import build_report
from stitchtrain.train.config import FitConfig

runner = CliRunner()
SOURCE, TARGET, POSITION = "dinov2-tiny", "clip-tiny", 2
LABEL = f"{SOURCE}[:{POSITION}]→{TARGET}"
SHARD = 16


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Parents' stores (layers 1..3, train and test), the FFM run, the hybrid's stores."""
    root = tmp_path_factory.mktemp("loose-ends")
    stores = extract_demo_stores(root / "data", root / "stores", models=[SOURCE, TARGET],
                                 layers=[1, 2, 3], shard_size=SHARD, per_class=4)  # fmt: skip
    run = root / "run"
    fit(FitConfig(source=stores[SOURCE, "train"], target=stores[TARGET, "train"],
                  position=POSITION, out=str(run), objective="ffm", lrs=(5e-3,), epochs=1,
                  patience=1, batch_size=8, stitch="linear"))  # fmt: skip
    hybrid = {}
    for split in ("train", "test"):
        plan = plan_extraction(
            ExtractConfig(models=[f"stitched:{run}"], data=str(root / "data" / "manifest.csv"),
                          out=str(root / "hybrid-stores"), layers=[3], split=split,
                          shard_size=SHARD)
        )  # fmt: skip
        run_extraction(plan)
        hybrid[split] = plan.urls[0]
    return {"root": root, "stores": stores, "run": run, "hybrid": hybrid}


# -- point 1: ls lists a damaged store; info counts images as ls does ----------------------------
def _two_stores(made, root: Path) -> tuple[str, str]:
    """Copies of the parents' train stores under ``root`` (good, to be damaged)."""
    urls = []
    for model in (SOURCE, TARGET):
        url = made["stores"][model, "train"]
        copy = root / "train" / Path(url).name
        shutil.copytree(url, copy)
        urls.append(str(copy))
    return urls[0], urls[1]


def _damage_labels_metadata(url: str) -> None:
    (Path(url) / "labels" / "zarr.json").write_text("{ not json")


def test_ls_lists_a_store_with_damaged_metadata_as_damaged(made, tmp_path):
    _, damaged = _two_stores(made, tmp_path)
    _damage_labels_metadata(damaged)
    with pytest.raises(StoreError) as opened:  # what ls used to drop silently
        FeatureStore.open(damaged)
    reason = str(opened.value)
    result = runner.invoke(featcache_app, ["ls", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("damaged:")]
    assert lines == [
        f"damaged: {damaged}: {reason} Run `featcache verify {damaged}` for every fault."
    ], result.output
    rows = [line for line in result.output.splitlines() if "│" in line]
    complete = [line.split("│")[-2].strip() for line in rows]
    assert sorted(c for c in complete if c) == ["damaged", "yes"], result.output


def test_ls_json_lists_stores_and_damaged_stores(made, tmp_path):
    good, damaged = _two_stores(made, tmp_path)
    _damage_labels_metadata(damaged)
    result = runner.invoke(featcache_app, ["ls", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert [s["url"] for s in listing["stores"]] == [good]
    assert listing["stores"][0]["encoder"] == SOURCE
    [entry] = listing["damaged"]
    assert entry["url"] == damaged
    assert "labels/zarr.json" in entry["reason"] and "\n" not in entry["reason"]
    assert entry["verify"] == f"featcache verify {damaged}"


def test_ls_lists_a_store_whose_root_attributes_contradict_each_other(made, tmp_path):
    """Edited ``num_shards``: opening refuses it, ls still names it."""
    _, damaged = _two_stores(made, tmp_path)
    meta = Path(damaged) / "zarr.json"
    document = json.loads(meta.read_text())
    document["attributes"]["featcache"]["num_shards"] += 1
    meta.write_text(json.dumps(document))
    result = runner.invoke(featcache_app, ["ls", str(tmp_path / "train"), "--json"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)["damaged"]
    assert entry["url"] == damaged and "num_shards" in entry["reason"]


def test_ls_leaves_out_zarr_groups_featcache_did_not_create(made, tmp_path):
    """Not every zarr.json is a store: a foreign Zarr group is neither listed nor damaged."""
    _two_stores(made, tmp_path)
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    )
    result = runner.invoke(featcache_app, ["ls", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert len(listing["stores"]) == 2 and listing["damaged"] == [], result.output


@pytest.fixture(scope="module")
def skipped_store(tmp_path_factory) -> str:
    """A class-folder store of 5 readable and 2 unreadable images (--on-bad-image skip)."""
    root = tmp_path_factory.mktemp("skips")
    data = root / "data"
    folder_with_unreadable_images(data)
    plan = plan_extraction(
        ExtractConfig(models=["dinov2-tiny"], data=str(data), out=str(root / "s"), layers=[1],
                      on_bad_image="skip")
    )  # fmt: skip
    run_extraction(plan)
    return plan.urls[0]


def test_info_counts_readable_and_skipped_images_as_ls_does(skipped_store):
    result = runner.invoke(featcache_app, ["info", skipped_store])
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.output.splitlines() if "│ images" in line]
    assert row.split("│")[2].strip() == "5 readable, 2 skipped", result.output
    listing = runner.invoke(featcache_app, ["ls", str(Path(skipped_store).parent), "--json"])
    [summary] = json.loads(listing.output)["stores"]
    assert (summary["images"], len(summary["skipped"])) == (7, 2)  # rows, as the store has them


# -- point 2: the report's Models table -----------------------------------------------------------
def _models_table(markdown: str) -> list[list[str]]:
    block = markdown.split("## Models", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return [row for row in rows if set(row) != {"---"}]


def test_report_names_the_encoder_each_sweep_key_stands_for(made, tmp_path):
    """Keys ``dinov2`` (a preset) and ``siglip2`` (here the hybrid's store): the Models table
    gives each key's encoder (the hybrid by its label), fingerprint, dataset and split, read
    from the stores the results record; it comes first on both pages."""
    source, hybrid = made["stores"][SOURCE, "train"], made["hybrid"]["train"]
    sweep = write_sweep_dir(tmp_path / "sweep", stores={"dinov2": source, "siglip2": hybrid})
    out = tmp_path / "report"
    build_report([sweep], out, cka=False, predictions=False)
    markdown = (out / "report.md").read_text()
    assert markdown.index("## Models") < markdown.index("## shapes")
    header, *rows = _models_table(markdown)
    assert header[:5] == ["key", "encoder", "fingerprint", "dataset", "split"]
    by_key = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert set(by_key) == {"dinov2", "siglip2"}
    for key, url in (("dinov2", source), ("siglip2", hybrid)):
        attrs = FeatureStore.open(url).attrs
        assert by_key[key]["fingerprint"] == attrs["encoder"]["fingerprint"]
        assert by_key[key]["dataset"] == attrs["dataset"]["source"]
        assert by_key[key]["split"] == "train" and by_key[key]["store"] == url
    assert by_key["dinov2"]["encoder"] == SOURCE
    assert by_key["siglip2"]["encoder"] == LABEL
    page = (out / "index.html").read_text()
    assert page.index("<h2>Models</h2>") < page.index("<h2>shapes")
    assert LABEL in page and "stitched:" not in page


def test_report_models_table_without_recorded_stores_says_so(tmp_path):
    out = tmp_path / "report"
    build_report([write_sweep_dir(tmp_path / "sweep")], out, cka=False, predictions=False)
    markdown = (out / "report.md").read_text()
    header, *rows = _models_table(markdown)
    by_key = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert by_key["dinov2"]["encoder"] == "dinov2-tiny"  # the results' own encoder column
    assert by_key["dinov2"]["fingerprint"] == "–"
    block = markdown.split("## Models", 1)[1].split("\n## ", 1)[0]
    assert "The results name no store of dinov2, siglip2" in block


def test_report_models_table_names_a_store_that_does_not_open(made, tmp_path):
    gone = str(tmp_path / "moved.zarr")
    stores = {"dinov2": made["stores"][SOURCE, "train"], "siglip2": gone}
    out = tmp_path / "report"
    build_report([write_sweep_dir(tmp_path / "sweep", stores=stores)], out, cka=False,
                 predictions=False)  # fmt: skip
    markdown = (out / "report.md").read_text()
    header, *rows = _models_table(markdown)
    by_key = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert (by_key["siglip2"]["encoder"], by_key["siglip2"]["store"]) == ("siglip2-tiny", gone)
    assert by_key["siglip2"]["fingerprint"] == "–"
    block = markdown.split("## Models", 1)[1].split("\n## ", 1)[0]
    assert f"The store of siglip2 at {gone} did not open: No featcache store" in block


# -- point 3: probe and CKA name a hybrid by its label -------------------------------------------
def test_probe_metrics_name_a_hybrid_by_its_label(made, tmp_path):
    metrics = probe_store(made["hybrid"]["train"], tmp_path / "probe",
                          test_store=made["hybrid"]["test"], epochs=1, lrs=(1e-2,))  # fmt: skip
    assert metrics["encoder"] == LABEL
    saved = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert saved["encoder"] == LABEL


def test_cka_names_a_hybrid_by_its_label(made, tmp_path):
    result = cka_stores(made["hybrid"]["train"], made["stores"][SOURCE, "train"], [3], [3])
    assert (result.encoder_a, result.encoder_b) == (LABEL, SOURCE)
    result.save(tmp_path / "cka")
    saved = json.loads((tmp_path / "cka" / "cka.json").read_text())
    assert (saved["encoder_a"], saved["encoder_b"]) == (LABEL, SOURCE)
    assert "stitched:" not in json.dumps(saved)
