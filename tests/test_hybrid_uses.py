"""Hybrid VFMs (issue 22) where other tools meet them: sweeps, transfers and the report name a
hybrid by its readable label; the tree takes a hybrid branch and counts its stitches' cost;
``featcache show`` / ``info`` and ``stitchtrain positions`` take hybrids; a hybrid is the
source of a further (linear and LoRA) fit.

One tiny pair of one token shape (dinov2-tiny -> clip-tiny at position 2, FFM, linear stitch),
so every layer of the hybrid is storable; the hybrid's stores (layers 1..4) extracted from its
run dir.
"""

from __future__ import annotations

import json

import pytest
from conftest import extract_demo_stores
from typer.testing import CliRunner

from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from stitchtrain.pipeline.fit import fit
from stitchtrain.train.config import FitConfig

runner = CliRunner()
SOURCE, TARGET, POSITION = "dinov2-tiny", "clip-tiny", 2
LABEL = f"{SOURCE}[:{POSITION}]→{TARGET}"
SHARD = 16


def _fit(source, target, position, out, objective="ffm", **options):
    common = dict(lrs=(5e-3,), epochs=1, patience=1, batch_size=8, stitch="linear")
    return fit(FitConfig(source=source, target=target, position=position, out=str(out),
                         objective=objective, **{**common, **options}))  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Parents' stores (layers 1..4, train and test), the FFM run, the hybrid's stores
    (layers 1..4)."""
    root = tmp_path_factory.mktemp("hybrid-uses")
    stores = extract_demo_stores(root / "data", root / "stores", models=[SOURCE, TARGET],
                                 layers=[1, 2, 3, 4], shard_size=SHARD)  # fmt: skip
    run = root / "run"
    _fit(stores[SOURCE, "train"], stores[TARGET, "train"], POSITION, run)
    hybrid = {}
    for split in ("train", "test"):
        plan = plan_extraction(
            ExtractConfig(models=[f"stitched:{run}"], data=str(root / "data" / "manifest.csv"),
                          out=str(root / "hybrid-stores"), layers=[1, 2, 3, 4], split=split,
                          shard_size=SHARD)
        )  # fmt: skip
        run_extraction(plan)
        hybrid[split] = plan.urls[0]
    return {"root": root, "stores": stores, "run": run, "hybrid": hybrid}


# -- point 1: readable names ---------------------------------------------------------------------
def test_sweep_points_name_a_hybrid_by_its_label(made):
    from stitchtrain.studies.sweep.grid import plan_sweep
    from stitchtrain.studies.sweep.results import _row

    stores = made["stores"]
    config = {
        "stores": {
            "hyb": dict(made["hybrid"]),
            "dino": {"train": stores[SOURCE, "train"], "test": stores[SOURCE, "test"]},
        },
        "grid": {"positions": [3], "objectives": ["lfm"], "stitches": ["linear"]},
    }
    plan = plan_sweep(config)
    names = {(p.source, p.source_encoder) for p in plan.points}
    assert names == {("hyb", LABEL), ("dino", SOURCE)}
    stitch = next(p for p in plan.points if (p.source, p.target) == ("dino", "hyb"))
    row = _row(stitch, "ok", {}, 0.0)
    assert (row["source_encoder"], row["target_encoder"]) == (SOURCE, LABEL)


def test_transfer_and_table12_name_a_hybrid_by_its_label(made, tmp_path):
    from stitchtrain.studies.analysis import prediction_analysis, transfer_run

    dino, hyb = made["stores"][SOURCE, "train"], made["hybrid"]["train"]
    _fit(dino, hyb, 3, tmp_path / "d-h")
    _fit(dino, dino, 3, tmp_path / "d-d")
    _fit(hyb, hyb, 3, tmp_path / "h-h")
    metrics = transfer_run(tmp_path / "d-h", dino, hyb, tmp_path / "transfer", epochs=1)
    assert (metrics["source_encoder"], metrics["target_encoder"]) == (SOURCE, LABEL)
    result = prediction_analysis(tmp_path / "d-h", tmp_path / "d-d", tmp_path / "h-h")
    assert result["stitched"] == f"{SOURCE}→{LABEL}"
    assert result["baseline_b"] == f"{LABEL}→{LABEL}"
    assert "stitched:" not in str(result)


# -- point 4 of the issue: hybrids in the tree -----------------------------------------------------
def _trunk(made):
    """dinov2-tiny as its store was extracted (the demo data's geometry)."""
    from featcache.store import FeatureStore
    from stitchtrain.train.encoders import load_run_encoder

    return load_run_encoder(FeatureStore.open(made["stores"][SOURCE, "train"]), None, False, "cpu")


def _tree_with_a_hybrid_branch(made, out):
    """Trunk dinov2-tiny at position 1; one branch fit from it into the hybrid's store (LFM,
    linear): the branch runs hybrid blocks 2..6, its inner stitch after block 2."""
    from stitchtrain.tree.model import VFMStitchTree

    run = out / "d-h1"
    _fit(made["stores"][SOURCE, "train"], made["hybrid"]["train"], 1, run, objective="lfm")
    return run, VFMStitchTree.from_runs(_trunk(made), 1, [run])


def test_a_tree_branch_can_be_a_hybrids_tail(made, tmp_path):
    import torch

    from stitchtrain.evaluate.evaluation import load_run

    run, tree = _tree_with_a_hybrid_branch(made, tmp_path)
    assert tree.names == [SOURCE, LABEL]
    assert tree.branches[0].encoder.name == f"stitched:{made['run'].resolve()}"
    trunk = _trunk(made)
    x = torch.randn(2, 3, *trunk.image_size, generator=torch.Generator().manual_seed(0))
    recipe = load_run(run)
    with torch.no_grad():
        outputs = tree(x)
        final, pooled = recipe.stitched_outputs(trunk.run(x, upto=1))
    assert torch.equal(outputs[LABEL][0], final) and torch.equal(outputs[LABEL][1], pooled)
    saved = tree.save(tmp_path / "tree")
    again = type(tree).load(saved)
    with torch.no_grad():
        assert torch.equal(again(x)[LABEL][0], final)


def test_tree_cost_counts_the_stitches_and_a_hybrids_inner_stitch(made, tmp_path):
    """Table 13's stitch columns against a hand count: the tree's linear stitch and the
    hybrid's inner one, both 96 -> 96 on 65 tokens (CLS + 8x8): parameters 96 * 96 + 96 each;
    FLOPs per image 2 * 65 * 96 * 96 each (a linear map: 2 x MACs; the aligner is the identity
    between equal layouts, and the bias add counts none)."""
    from stitchtrain.tree.bench import run_bench
    from stitchtrain.tree.bench_config import BenchConfig

    _, tree = _tree_with_a_hybrid_branch(made, tmp_path)
    saved = tree.save(tmp_path / "tree")
    result = run_bench(BenchConfig(tree=str(saved), batch_sizes=(1,), warmup=0, repeats=1,
                                   device="cpu"))  # fmt: skip
    naive, vst = result["cost"]
    per_stitch = {"params": 96 * 96 + 96, "flops": 2 * 65 * 96 * 96}
    assert vst["stitches"] == 2
    assert vst["stitch_params"] == 2 * per_stitch["params"]
    assert vst["stitch_gflops"] * 1e9 == pytest.approx(2 * per_stitch["flops"], rel=1e-12)
    assert naive["stitches"] == 1  # the naive system runs the hybrid whole: its inner stitch
    assert naive["stitch_params"] == per_stitch["params"]
    assert naive["stitch_gflops"] * 1e9 == pytest.approx(per_stitch["flops"], rel=1e-12)
    # blocks: trunk 1..6, the hybrid's 2..6 (dinov2 block 2, clip blocks 3..6), each once
    assert vst["blocks_run"] == 6 + 5


# -- fit --dry-run on an unlabelled corpus -------------------------------------------------------
def test_dry_run_of_a_task_agnostic_fit_asks_for_no_test_stores(made, tmp_path):
    """An FFM fit on an unlabelled LLaVA-style corpus (no test split) plans as it runs: no
    test stores, no test loader, no test score."""
    import json
    import shutil

    from cli.stitchtrain_app import app as stitchtrain_app

    data = made["root"] / "data"
    images = sorted((data / "images").rglob("*.png"))
    corpus = [{"id": str(i), "image": str(path.relative_to(data))} for i, path in enumerate(images)]
    (tmp_path / "llava.json").write_text(json.dumps(corpus))
    shutil.copytree(data / "images", tmp_path / "images")
    plan = plan_extraction(
        ExtractConfig(models=[SOURCE, TARGET], data=str(tmp_path / "llava.json"),
                      out=str(tmp_path / "corpus"), layers=[POSITION], shard_size=SHARD)
    )  # fmt: skip
    run_extraction(plan)
    source, target = plan.urls
    args = ["fit", "--source", source, "--target", target, "--position", str(POSITION),
            "--objective", "ffm", "--out", str(tmp_path / "ffm"), "--lr", "5e-3",
            "--epochs", "1"]  # fmt: skip
    dry = runner.invoke(stitchtrain_app, [*args, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.output[dry.output.index("{") :])
    assert planned["test_rows"] == 0 and "test" not in planned["loaders"]
    assert planned["evaluation"].startswith("none: unlabelled")
    assert not (tmp_path / "ffm").exists()
    done = runner.invoke(stitchtrain_app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output[done.output.index("{") :])["evaluation"] == planned["evaluation"]


# -- point 1's loose ends: show, info, positions, a hybrid as the source of a fit -----------------
def _flat(output: str) -> str:
    """CLI output as one line of words: table borders and wrapping removed."""
    return " ".join(output.translate(str.maketrans("│┃", "  ")).split())


def test_featcache_show_and_info_of_a_hybrid_store(made, tmp_path):
    from cli.featcache_app import app as featcache_app

    url = made["hybrid"]["test"]
    shown = runner.invoke(featcache_app, ["show", url, "--images", "2", "--layer", "3",
                                          "--out", str(tmp_path / "maps.png")])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "maps.png").stat().st_size > 0
    info = runner.invoke(featcache_app, ["info", url])
    assert info.exit_code == 0, info.output
    text = _flat(info.output)
    for needle in (f"hybrid {LABEL}", f"source {SOURCE}", f"position {POSITION}",
                   f"target {TARGET}", "stage ffm", "linear stitch"):  # fmt: skip
        assert needle in text, (needle, text)


def test_ls_names_a_hybrid_store_by_its_label(made):
    """The encoder column reads `dinov2-tiny[:2]→clip-tiny`, not the run dir's path; the JSON
    keeps the name (`stitched:DIR`, what loads it) and adds the label."""
    from cli.featcache_app import app as featcache_app

    root = str(made["root"] / "hybrid-stores")
    listed = runner.invoke(featcache_app, ["ls", root])
    assert listed.exit_code == 0, listed.output
    assert LABEL in _flat(listed.output) and "stitched:" not in listed.output
    as_json = runner.invoke(featcache_app, ["ls", root, "--json"])
    (store, *_) = json.loads(as_json.output)["stores"]
    assert store["label"] == LABEL and store["encoder"] == f"stitched:{made['run']}"


def test_positions_of_hybrid_names_and_stores(made):
    from cli.stitchtrain_app import app as stitchtrain_app

    by_name = runner.invoke(stitchtrain_app, ["positions", f"stitched:{made['run']}", SOURCE])
    assert by_name.exit_code == 0, by_name.output
    assert f"{LABEL} -> {SOURCE}" in _flat(by_name.output)
    assert "stitch positions: 1..5" in by_name.output
    stores = [made["hybrid"]["train"], made["stores"][SOURCE, "train"]]
    by_store = runner.invoke(stitchtrain_app, ["positions", *stores, "--objective", "lfm"])
    assert by_store.exit_code == 0, by_store.output
    assert f"{LABEL} -> {SOURCE}" in _flat(by_store.output)
    assert "these stores allow: 1, 2, 3, 4" in _flat(by_store.output)


@pytest.mark.parametrize("stitch", ["linear", "lora"])
def test_a_hybrid_is_the_source_of_a_further_fit(made, tmp_path, stitch):
    """hybrid -> dinov2-tiny at position 3: a linear stitch reads hybrid layer 3; a LoRA one
    hybrid layer 2 and a LoRA copy of the hybrid's block 3, which is the inner stitch, then
    clip block 3 (with zero LoRA factors: the hybrid's own layer 3, bit for bit)."""
    import torch

    import featcache
    from stitchtrain.evaluate.evaluation import load_run

    out = tmp_path / stitch
    metrics = _fit(made["hybrid"]["train"], made["stores"][SOURCE, "train"], 3, out,
                   stitch=stitch, lora_rank=4)  # fmt: skip
    assert 0 <= metrics["test_accuracy"] <= 1
    recipe = load_run(out)
    hybrid = featcache.load_encoder(f"stitched:{made['run']}")
    x = torch.randn(2, 3, *hybrid.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final, pooled = recipe.stitched_outputs(hybrid.run(x, upto=2 if stitch == "lora" else 3))
        want = recipe.target_encoder.run_from(recipe.stitch(hybrid.run(x, upto=2 if stitch ==
                                              "lora" else 3)), 3)  # fmt: skip
    assert torch.equal(final, want[0]) and torch.equal(pooled, want[1])
    if stitch == "lora":
        source = recipe.stitch._source_encoder[0]
        assert source.fingerprint == hybrid.fingerprint
        with torch.no_grad():
            for name, tensor in recipe.stitch.named_parameters():
                if "lora_B" in name:
                    tensor.zero_()
            layer2 = hybrid.run(x, upto=2)
            adapted = source.run_block(3, layer2, block=recipe.stitch.block)
        assert torch.equal(adapted, hybrid.run(x, upto=3))
