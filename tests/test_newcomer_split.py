"""Issue 23, point 3: a test split from a plain class folder.

``--test-fraction F`` holds out a seeded, class-stratified test split of a folder of class
subfolders (which has only ``train``): the same partition whatever ``--split`` is asked,
recorded in the manifest hash. Both errors a newcomer meets without it (``extract --split
test`` and ``fit`` finding no test store) name the ways to get a test split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.datasets import DataOptions, ManifestError, load_dataset
from featcache.store import FeatureStore

runner = CliRunner()
MODELS = ("dinov2-tiny", "clip-tiny")
# images per class: rounding up, down, the at-least-one rule and a single image
SIZES = {"cat": 10, "dog": 4, "eel": 2, "fox": 1}
WAYS = ("--test-fraction F", "--per-class train=N,test=M", "train/ and test/")


def write_class_folder(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, count in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_class_folder(tmp_path_factory.mktemp("newcomer-split") / "photos", SIZES)


def store_ids(store: FeatureStore) -> list[str]:
    return list(store.read("ids"))


def held_out(folder: Path, fraction: float = 0.4, **options):
    return load_dataset(folder, options=DataOptions(test_fraction=fraction, **options))


def ids(dataset, split: str) -> list[str]:
    return [record.id for record in dataset.split(split)]


def one_line_error(result) -> str:
    """The CLI's one ``error: ...`` line, its last (exit 2, no traceback; progress lines such
    as "loading MODEL" may come before it)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.output
    return errors[0]


def test_held_out_count_rule():
    from featcache.datasets.holdout import held_out_count

    assert [held_out_count(n, 0.2) for n in (0, 1, 2, 3, 7, 8, 10)] == [0, 0, 1, 1, 1, 2, 2]
    assert held_out_count(5, 0.5) == 3  # half rounds up
    assert held_out_count(2, 0.9) == 1  # train keeps one image of every class of 2+
    assert held_out_count(10, 0.99) == 9


def test_held_out_split_is_stratified_disjoint_and_complete(folder):
    plain = load_dataset(folder)
    assert plain.splits() == ["train"] and plain.selection == {}
    dataset = held_out(folder, 0.4)
    assert dataset.splits() == ["test", "train"]
    train, test = ids(dataset, "train"), ids(dataset, "test")
    assert not set(train) & set(test)
    assert sorted(train + test) == ids(plain, "train")
    per_class = {
        name: sum(r.label == label for r in dataset.split("test"))
        for label, name in enumerate(dataset.classes)
    }
    assert per_class == {"cat": 4, "dog": 2, "eel": 1, "fox": 0}
    assert dataset.classes == plain.classes
    for record in dataset.records:  # labels are the folder's
        assert record.id.split("/")[0] == dataset.classes[record.label]


def test_same_partition_on_every_read_and_seeded(folder):
    first, again = held_out(folder), held_out(folder)
    assert ids(first, "test") == ids(again, "test")
    assert first.manifest_hash("test") == again.manifest_hash("test")
    other = held_out(folder, subset_seed=1)
    assert ids(other, "test") != ids(first, "test")
    assert other.manifest_hash("train") != first.manifest_hash("train")


def test_recorded_in_the_manifest_hash(folder):
    plain, dataset = load_dataset(folder), held_out(folder, 0.4)
    assert dataset.selection == {"test_fraction": {"fraction": 0.4, "seed": 0}}
    assert dataset.manifest_hash("train") != plain.manifest_hash("train")
    assert held_out(folder, 0.3).manifest_hash("test") != dataset.manifest_hash("test")
    # stores made without it keep their hashes: no selection, the original formula
    rows = [[r.id, r.label, None] for r in plain.split("train")]
    text = json.dumps({"classes": list(plain.classes), "records": rows}, separators=(",", ":"))
    assert plain.manifest_hash("train") == hashlib.sha256(text.encode()).hexdigest()[:32]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_a_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ManifestError, match=r"Expected --test-fraction between 0 and 1"):
        DataOptions(test_fraction=fraction)


def test_cli_refuses_a_bad_fraction_in_one_line(folder, tmp_path):
    result = runner.invoke(
        featcache_app,
        ["extract", "--model", "dinov2-tiny", "--data", str(folder), "--out",
         str(tmp_path), "--test-fraction", "1.5"],
    )  # fmt: skip
    line = one_line_error(result)
    assert "--test-fraction" in line and "1.5" in line


def test_a_folder_with_a_test_split_is_refused(tmp_path):
    root = tmp_path / "data"
    write_class_folder(root / "train", {"cat": 3, "dog": 3})
    write_class_folder(root / "test", {"cat": 1, "dog": 1}, seed=1)
    with pytest.raises(ManifestError) as caught:
        held_out(root, 0.2)
    message = str(caught.value)
    assert "\n" not in message
    assert "test split" in message and str(root) in message and "--split test" in message


def test_data_other_than_a_class_folder_is_refused(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.jpg,0\n")
    with pytest.raises(ManifestError, match="Expected --test-fraction only with data it"):
        held_out(manifest, 0.2)


def test_every_class_of_one_image_holds_nothing_out(tmp_path):
    root = write_class_folder(tmp_path / "tiny", {"cat": 1, "dog": 1})
    with pytest.raises(ManifestError, match="at least one image"):
        held_out(root, 0.5)


def test_extract_split_test_of_a_plain_folder_names_the_ways(folder, tmp_path):
    result = runner.invoke(
        featcache_app,
        ["extract", "--model", "dinov2-tiny", "--data", str(folder), "--out",
         str(tmp_path), "--split", "test"],
    )  # fmt: skip
    line = one_line_error(result)
    assert "'train'" in line and "Got 'test'" in line
    for way in WAYS:
        assert way in line, line


def test_describe_shows_the_held_out_split(folder):
    result = runner.invoke(
        featcache_app, ["dataset", "describe", str(folder), "--test-fraction", "0.4", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["splits"]["test"]["per_class"] == {"cat": 4, "dog": 2, "eel": 1, "fox": 0}
    assert summary["selection"] == {"test_fraction": {"fraction": 0.4, "seed": 0}}


def extract(folder: Path, out: Path, split: str, *options: str) -> list[str]:
    """Extract both MODELS (layers 1, 2) through the CLI; the store urls, in MODELS order."""
    args = ["extract", "--data", str(folder), "--out", str(out), "--layers", "1,2",
            "--split", split, "--shard-size", "8", "--json", *options]  # fmt: skip
    for model in MODELS:
        args += ["--model", model]
    result = runner.invoke(featcache_app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    return [store["url"] for store in summary["stores"]]


def fit(source: str, target: str, out: Path, *options: str):
    """A one-epoch LFM linear stitch at position 2 through the CLI (``--json``)."""
    args = ["fit", "--source", source, "--target", target, "--position", "2", "--out",
            str(out), "--objective", "lfm", "--stitch", "linear", "--lr", "5e-3",
            "--epochs", "1", "--patience", "1", "--batch-size", "8", "--json"]  # fmt: skip
    return runner.invoke(stitchtrain_app, [*args, *options])


@pytest.fixture(scope="module")
def held_out_stores(folder, tmp_path_factory):
    """{split: [dinov2-tiny url, clip-tiny url]} of ``folder`` with --test-fraction 0.4."""
    out = tmp_path_factory.mktemp("newcomer-split-stores")
    return {s: extract(folder, out, s, "--test-fraction", "0.4") for s in ("train", "test")}


def test_extracted_splits_pair_and_partition_the_folder(held_out_stores, folder):
    train = [FeatureStore.open(url) for url in held_out_stores["train"]]
    test = [FeatureStore.open(url) for url in held_out_stores["test"]]
    for stores in (train, test):  # the two encoders' stores of a split pair
        assert len({s.attrs["dataset"]["manifest_hash"] for s in stores}) == 1
        assert store_ids(stores[0]) == store_ids(stores[1])
    train_ids, test_ids = set(store_ids(train[0])), set(store_ids(test[0]))
    assert not train_ids & test_ids
    assert sorted(train_ids | test_ids) == ids(load_dataset(folder), "train")
    assert len(test_ids) == 7
    assert train[0].attrs["dataset"]["options"] == {"test_fraction": 0.4}


def test_fit_on_the_held_out_stores_runs_and_scores_the_test_split(held_out_stores, tmp_path):
    (source, target), tests = held_out_stores["train"], held_out_stores["test"]
    result = fit(source, target, tmp_path / "run")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{\n") :])
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config.get("source_test"), config.get("target_test")) in ((None, None), tuple(tests))


def test_fit_without_a_test_split_names_the_ways(folder, tmp_path):
    out = tmp_path / "stores"
    source, target = extract(folder, out, "train")  # a plain folder: train only
    line = one_line_error(fit(source, target, tmp_path / "run"))
    assert "'test'" in line
    for way in WAYS:
        assert way in line, line
    # a test split held out by --test-fraction does not pair with a train store made without
    # it (that store holds the test images): refused, naming both
    (source_test, _) = extract(folder, out, "test", "--test-fraction", "0.4")
    line = one_line_error(fit(source, target, tmp_path / "run"))
    assert source in line and "(no --test-fraction)" in line
    assert source_test in line and "(--test-fraction 0.4 --subset-seed 0)" in line
    assert "extract both splits with the same --test-fraction and --subset-seed" in line
