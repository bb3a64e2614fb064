"""Hybrid VFMs (issue 22): ``stitched:RUN_DIR`` is an encoder like any other.

One tiny pair (dinov2-tiny -> siglip2-tiny: other widths, prefix and input size, so the
stitch aligns tokens), float32 stores so stored tokens compare bit for bit, one FFM+TLT run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import featcache
from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.demo_data import make_demo_dataset
from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore
from stitchtrain.evaluate.evaluation import load_run
from stitchtrain.pipeline.fit import fit
from stitchtrain.train.config import FitConfig

runner = CliRunner()
SOURCE, TARGET, POSITION = "dinov2-tiny", "siglip2-tiny", 2
LAYERS = [1, 2, 3, 4]
SHARD = 8


def _extract(models, manifest, out, split, layers=LAYERS):
    plan = plan_extraction(
        ExtractConfig(
            models=list(models),
            data=str(manifest),
            out=str(out),
            layers=list(layers),
            split=split,
            dtype="float32",
            shard_size=SHARD,
            batch_size=SHARD,
        )
    )
    run_extraction(plan)
    return dict(zip(models, plan.urls, strict=True))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Stores of both parents (train, test), one finished FFM+TLT run, one self-stitch run
    and one probe dir."""
    root = tmp_path_factory.mktemp("hybrid")
    manifest = make_demo_dataset(root / "data", num_classes=2, per_class=8, size=48)
    stores = {split: _extract([SOURCE, TARGET], manifest, root / "stores", split)
              for split in ("train", "test")}  # fmt: skip
    common = dict(lrs=(5e-3,), epochs=2, patience=1, batch_size=8)
    run = root / "run"
    fit(FitConfig(source=stores["train"][SOURCE], target=stores["train"][TARGET],
                  position=POSITION, out=str(run), objective="ffm+tlt", **common))  # fmt: skip
    self_run = root / "self"
    fit(FitConfig(source=stores["train"][SOURCE], target=stores["train"][SOURCE],
                  position=POSITION, out=str(self_run), objective="lfm", **common))  # fmt: skip
    probe = root / "probe"
    result = runner.invoke(
        stitchtrain_app, ["probe", "--store", stores["train"][TARGET], "--out", str(probe),
                          "--lr", "5e-3", "--epochs", "2"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"root": root, "manifest": manifest, "stores": stores, "run": run,
            "self": self_run, "probe": probe}  # fmt: skip


def _images(pair, encoder, count=4):
    from featcache.datasets import load_dataset

    records = load_dataset(str(pair["manifest"])).ordered("test", seed=0)[:count]
    return torch.stack([encoder.preprocess(record.decode()) for record in records])


def test_stitched_run_dir_is_an_encoder_equal_to_the_runs_stitched_forward(pair):
    hybrid = featcache.load_encoder(f"stitched:{pair['run']}")
    recipe = load_run(pair["run"])
    source, target = hybrid.source, hybrid.target
    assert isinstance(hybrid, featcache.Encoder)
    assert (hybrid.depth, hybrid.width, hybrid.grid) == (target.depth, target.width, target.grid)
    assert hybrid.layout == target.layout and hybrid.pooled_width == target.pooled_width
    assert hybrid.preprocessing == source.preprocessing
    x = _images(pair, hybrid)
    with torch.no_grad():
        final, pooled = hybrid(x)
        want_final, want_pooled = recipe.stitched_outputs(source.run(x, upto=POSITION))
    assert torch.equal(final, want_final) and torch.equal(pooled, want_pooled)
    with torch.no_grad():  # layers 0..n are the source's, n+1.. the target's blocks
        assert torch.equal(hybrid.run(x, upto=POSITION), source.run(x, upto=POSITION))
        stitched = recipe.stitch(source.run(x, upto=POSITION))
        assert torch.equal(hybrid.run(x, upto=POSITION + 1), target.run_block(3, stitched))
    assert hybrid.describe()["hybrid"]["label"] == f"{SOURCE}[:{POSITION}]→{TARGET}"
    assert hybrid.describe()["hybrid"]["stage"] == "tlt"


def test_run_from_every_layer_equals_the_whole_forward(pair):
    hybrid = featcache.load_encoder(f"stitched:{pair['run']}")
    x = _images(pair, hybrid)
    with torch.no_grad():
        final, pooled = hybrid(x)
        for k in range(hybrid.depth + 1):
            got_final, got_pooled = hybrid.run_from(hybrid.run(x, upto=k), k)
            assert torch.equal(got_final, final) and torch.equal(got_pooled, pooled), k
        taken, run_final, _ = hybrid.run_layers(x, [1, 3, 6])
    assert torch.equal(run_final, final) and torch.equal(taken[3], hybrid.run(x, upto=3))


def test_fingerprint_chains_parents_stitch_and_stage(pair):
    tlt = featcache.load_encoder(f"stitched:{pair['run']}")
    again = featcache.load_encoder(f"stitched:{pair['run']}#tlt")
    ffm = featcache.load_encoder(f"stitched:{pair['run']}#ffm")
    assert tlt.fingerprint == again.fingerprint
    assert ffm.fingerprint != tlt.fingerprint
    assert tlt.fingerprint not in (tlt.source.fingerprint, tlt.target.fingerprint)
    x = _images(pair, tlt, 2)
    with torch.no_grad():
        assert not torch.equal(ffm(x)[0], tlt(x)[0])


def _extract_cli(pair, model, out, *extra):
    return runner.invoke(
        featcache_app,
        ["extract", "--model", model, "--data", str(pair["manifest"]), "--out", str(out),
         "--dtype", "float32", "--shard-size", str(SHARD), "--batch-size", str(SHARD), *extra],
    )  # fmt: skip


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output  # progress lines ("loading ...") may come first
    text = " ".join(result.output[result.output.index("error:") :].split())
    for needle in needles:
        assert needle in text, (needle, text)


def test_bad_run_dirs_are_one_line_errors_and_write_nothing(pair, tmp_path):
    run = pair["run"]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "metrics.json").unlink()
    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered)
    data = bytearray((tampered / "stitch-tlt.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "stitch-tlt.safetensors").write_bytes(bytes(data))
    deep = tmp_path / "deep"
    shutil.copytree(run, deep)
    (deep / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    cases = [
        (f"stitched:{unfinished}", ["unfinished", "no metrics.json"]),
        (f"stitched:{run}#lfm", ["Expected a stage of run dir", "ffm, tlt", "'lfm'"]),
        (f"stitched:{tampered}", ["stitch-tlt.safetensors", "SHA-256", "changed"]),
        (f"stitched:{pair['self']}", ["self-stitch of dinov2-tiny"]),
        (f"stitched:{pair['probe']}", ["linear-probe run dir"]),
        (f"stitched:{tmp_path / 'absent'}", ["not a directory"]),
        (f"stitched:{deep}", ["config.json", "nested too deeply"]),
    ]
    for model, needles in cases:
        out = tmp_path / "out"
        _one_line_error(_extract_cli(pair, model, out, "--layers", "3"), *needles)
        assert not out.exists(), model
    with pytest.raises(FeatcacheError, match="source's"):  # source tokens: not storable
        plan_extraction(
            ExtractConfig(models=[f"stitched:{run}"], data=str(pair["manifest"]),
                          out=str(tmp_path / "out"), layers=[2, 3])
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def hybrid_stores(pair):
    """The hybrid's stores (train, test) extracted through the CLI, layers 3, 4."""
    urls = {}
    for split in ("train", "test"):
        result = _extract_cli(
            pair, f"stitched:{pair['run']}", pair["root"] / "hybrid-stores", "--layers", "3,4",
            "--split", split, "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        urls[split] = json.loads(result.output[result.output.index("{") :])["stores"][0]["url"]
    return urls


def test_extracted_hybrid_store_verifies_and_holds_the_runs_stitched_tokens(pair, hybrid_stores):
    url = hybrid_stores["test"]
    result = runner.invoke(featcache_app, ["verify", url, "--json"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(url)
    source = FeatureStore.open(pair["stores"]["test"][SOURCE])
    assert store.attrs["encoder"]["hybrid"]["label"] == f"{SOURCE}[:{POSITION}]→{TARGET}"
    assert np.array_equal(store.read("ids"), source.read("ids"))
    recipe = load_run(pair["run"])
    target = recipe.target_encoder
    for shard in range(store.num_shards):  # the extraction's batches: one per shard
        rows = slice(*store.shard_rows(shard))
        tokens = torch.from_numpy(source.read(f"layers/{POSITION}", rows))
        with torch.no_grad():
            stitched = recipe.stitch(tokens)
            layer3 = target.run_block(3, stitched)
            layer4 = target.run_block(4, layer3)
            final, pooled = recipe.stitched_outputs(tokens)
        for name, want in (("layers/3", layer3), ("layers/4", layer4), ("final", final),
                           ("pooled", pooled)):  # fmt: skip
            assert np.array_equal(store.read(name, rows), want.numpy()), (name, shard)
    again = _extract_cli(pair, f"stitched:{pair['run']}", pair["root"] / "hybrid-stores",
                         "--layers", "3,4", "--split", "test")  # fmt: skip
    assert again.exit_code == 0 and "complete, nothing to do" in " ".join(again.output.split())


def test_extract_of_a_hybrid_without_layers_stores_its_own_layers(pair, tmp_path):
    """No --layers: the depth-aware default, less the source's layers whose tokens are not the
    hybrid's shape (dinov2-tiny's 1..2 beside siglip2-tiny's tokens); given, they are refused."""
    result = _extract_cli(pair, f"stitched:{pair['run']}", tmp_path / "default", "--split", "test")
    assert result.exit_code == 0, result.output
    (url,) = [str(p) for p in (tmp_path / "default" / "test").glob("*.zarr")]
    assert FeatureStore.open(url).layers == [3, 4, 5, 6]
    refused = _extract_cli(pair, f"stitched:{pair['run']}", tmp_path / "given", "--layers", "1,3")
    _one_line_error(refused, "layers 0..2 are its source's")


def test_fit_with_a_hybrid_as_target_loads_its_tail_by_name(pair, hybrid_stores, tmp_path):
    """FFM from dinov2-tiny into the hybrid at layer 3: the tail is stitched:RUN's blocks 4..6,
    loaded through load_encoder and checked against the store's fingerprint."""
    out = tmp_path / "again"
    metrics = fit(FitConfig(source=pair["stores"]["train"][SOURCE], target=hybrid_stores["train"],
                            position=3, out=str(out), objective="ffm", lrs=(5e-3,), epochs=1,
                            batch_size=8))  # fmt: skip
    assert 0 <= metrics["test_accuracy"] <= 1
    recipe = load_run(out)
    assert recipe.target_encoder.name == f"stitched:{pair['run'].resolve()}"


def test_stitching_into_a_hybrid_starts_at_its_own_layers(pair, hybrid_stores, tmp_path):
    """siglip2-tiny's tokens are not dinov2-tiny's: a stitch into the hybrid must produce one
    of the hybrid's own layers (3..), not one of its source's (1, 2), though FFM reads only
    the target's final tokens."""
    from stitchtrain.data.pairing import PairingError, usable_positions

    source = FeatureStore.open(pair["stores"]["train"][SOURCE])
    target = FeatureStore.open(hybrid_stores["train"])
    assert target.attrs["encoder"]["hybrid"]["own_layers_from"] == POSITION + 1
    assert usable_positions(source, target, stitch="linear", objective="ffm") == [3, 4]
    config = FitConfig(source=source.url, target=target.url, position=POSITION,
                       out=str(tmp_path / "into"), objective="ffm", lrs=(5e-3,), epochs=1,
                       batch_size=8)  # fmt: skip
    with pytest.raises(PairingError, match="at least 3 into the hybrid"):
        fit(config)
    assert not (tmp_path / "into").exists()


def test_task_agnostic_recipe_llava_ffm_export_extract_probe(pair, tmp_path):
    """README "Hybrid VFMs": FFM on an unlabelled LLaVA-style corpus (no test split, no
    labels) -> export -> extract the hybrid on a labelled dataset -> probe it and both
    parents: one table, as Table 4."""
    data = pair["manifest"].parent
    images = sorted((data / "images").rglob("*.png"))
    corpus = [{"id": str(i), "image": str(path.relative_to(data)),
               "conversations": [{"from": "human", "value": "<image>"}]}
              for i, path in enumerate(images)]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(corpus))
    shutil.copytree(data / "images", tmp_path / "images")
    stores = _extract([SOURCE, TARGET], tmp_path / "llava.json", tmp_path / "corpus", "train",
                      layers=[POSITION])  # fmt: skip
    metrics = fit(FitConfig(source=stores[SOURCE], target=stores[TARGET], position=POSITION,
                            out=str(tmp_path / "ffm"), objective="ffm", lrs=(5e-3,), epochs=2,
                            batch_size=8))  # fmt: skip
    assert metrics["evaluation"].startswith("none: unlabelled")
    result = runner.invoke(
        stitchtrain_app, ["export", str(tmp_path / "ffm"), "--out", str(tmp_path / "hybrid")]
    )
    assert result.exit_code == 0, result.output
    hybrid_stores = {}
    for split in ("train", "test"):
        result = _extract_cli(pair, f"stitched:{tmp_path / 'hybrid'}", tmp_path / "labelled",
                              "--layers", "3", "--split", split, "--json")  # fmt: skip
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output[result.output.index("{") :])["stores"][0]
        hybrid_stores[split] = summary["url"]
    table = {}
    for train in (hybrid_stores["train"], pair["stores"]["train"][SOURCE],
                  pair["stores"]["train"][TARGET]):  # fmt: skip
        out = tmp_path / "probes" / str(len(table))
        args = ["probe", "--store", train, "--out", str(out), "--lr", "5e-3", "--epochs", "3"]
        result = runner.invoke(stitchtrain_app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        encoder = FeatureStore.open(train).attrs["encoder"]
        name = (encoder.get("hybrid") or {}).get("label", encoder["name"])
        table[name] = json.loads(result.output[result.output.index("{") :])["test_accuracy"]
    assert list(table) == [f"{SOURCE}[:{POSITION}]→{TARGET}", SOURCE, TARGET]
    assert all(0 <= accuracy <= 1 for accuracy in table.values())
