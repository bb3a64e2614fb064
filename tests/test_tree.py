"""VFM Stitch Tree: equal to the separately stitched models, trunk once, saved without pickle,
refused on mismatched fingerprints or positions, and its cost table equal to Table 13's formula."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import featcache
from cli.tree_app import tree_app
from featcache.demo_data import make_demo_dataset
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from stitchtrain.model.stitches import build_stitch
from stitchtrain.pipeline.fit import fit
from stitchtrain.train.config import FitConfig
from stitchtrain.tree.bench import run_bench
from stitchtrain.tree.bench_config import BenchConfig
from stitchtrain.tree.cost import additional_cost
from stitchtrain.tree.errors import TreeError
from stitchtrain.tree.model import VFMStitchTree

TRUNK = "dinov2-tiny"
POSITION = 2
# branch encoder -> stitch kind; dinov3 exercises the LoRA stitch (trunk layer n-1 + block n)
BRANCHES = {"clip-tiny": "mlp", "siglip2-tiny": "linear", "dinov3-tiny": "lora"}

runner = CliRunner()
cli = typer.Typer()
cli.add_typer(tree_app, name="tree")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{target encoder: run dir} of one-epoch LFM fits from dinov2-tiny at position 2."""
    root = tmp_path_factory.mktemp("tree")
    manifest = make_demo_dataset(root / "data", num_classes=2, per_class=6, size=64)
    models = [TRUNK, *BRANCHES]
    urls = {}
    for split in ("train", "test"):
        config = ExtractConfig(
            models=models,
            data=str(manifest),
            out=str(root / "stores"),
            layers=[1, 2],
            split=split,
            dtype="float32",
            num_workers=0,
            # the presets' own geometry, which the trunks loaded by name below have (a split
            # with masks, as the demo data has, would otherwise default to squash)
            resize_mode="shortest",
        )
        plan = plan_extraction(config)
        run_extraction(plan)
        urls.update({(m, split): u for m, u in zip(models, plan.urls, strict=True)})
    run_dirs = {}
    for target, kind in BRANCHES.items():
        run_dirs[target] = root / "runs" / target
        fit(
            FitConfig(
                source=urls[TRUNK, "train"],
                target=urls[target, "train"],
                position=POSITION,
                out=str(run_dirs[target]),
                stitch=kind,
                objective="lfm",
                lrs=(5e-3,),
                epochs=1,
                lora_rank=4,
            )
        )
    return run_dirs


def _images(batch: int = 2) -> torch.Tensor:
    trunk = featcache.load_encoder(TRUNK)
    return torch.randn(batch, 3, *trunk.image_size, generator=torch.Generator().manual_seed(0))


def _tree(runs, **kwargs) -> VFMStitchTree:
    trunk = featcache.load_encoder(TRUNK)
    return VFMStitchTree.from_runs(trunk, POSITION, list(runs.values()), **kwargs)


def _separately(run_dir, target: str, kind: str, images):
    """The stitched model of one run dir, run on its own: trunk 1..n, stitch, target n+1..N."""
    trunk = featcache.load_encoder(TRUNK)
    encoder = featcache.load_encoder(target)
    stitch = build_stitch(
        kind,
        source=trunk.layout,
        target=encoder.layout,
        source_width=trunk.width,
        target_width=encoder.width,
        source_encoder=trunk if kind == "lora" else None,
        position=POSITION,
        lora_rank=4,
    )
    stitch.load_state_dict(load_file(str(run_dir / "stitch.safetensors")))
    source_layer = trunk.run(images, upto=POSITION - 1 if kind == "lora" else POSITION)
    return encoder.run_from(stitch(source_layer), POSITION)


@torch.no_grad()
def test_tree_outputs_equal_separate_stitched_models(runs):
    images = _images()
    tree = _tree(runs)
    outputs = tree(images)
    assert list(outputs) == [TRUNK, *BRANCHES] == tree.names
    assert tree.has_lora and tree.shared_blocks == POSITION - 1
    trunk_final, trunk_pooled = featcache.load_encoder(TRUNK)(images)
    assert torch.equal(outputs[TRUNK][0], trunk_final)
    assert torch.equal(outputs[TRUNK][1], trunk_pooled)
    for target, kind in BRANCHES.items():
        final, pooled = _separately(runs[target], target, kind, images)
        assert torch.equal(outputs[target][0], final), target
        assert torch.equal(outputs[target][1], pooled), target
    # without a LoRA branch the trunk shares all n blocks
    plain = _tree({k: v for k, v in runs.items() if BRANCHES[k] != "lora"})
    assert plain.shared_blocks == POSITION
    again = plain(images)
    for name in plain.names:
        assert torch.equal(again[name][0], outputs[name][0]), name


@torch.no_grad()
def test_trunk_blocks_run_once_per_forward(runs):
    tree = _tree(runs)
    calls: dict[tuple[str, int], int] = {}

    def counter(key):
        def hook(*_):
            calls[key] = calls.get(key, 0) + 1

        return hook

    encoders = {TRUNK: tree.trunk, **{b.name: b.encoder for b in tree.branches}}
    for name, encoder in encoders.items():
        for n in range(1, encoder.depth + 1):
            encoder.block(n).register_forward_hook(counter((name, n)))
    tree(_images(batch=3))
    trunk_depth = tree.trunk.depth
    assert all(calls[TRUNK, n] == 1 for n in range(1, trunk_depth + 1))
    for branch in tree.branches:
        depth = branch.encoder.depth
        assert [calls.get((branch.name, n), 0) for n in range(1, depth + 1)] == [0] * POSITION + [
            1
        ] * (depth - POSITION)
        # pruned: the blocks the tree never runs hold no weights
        assert all(p.numel() == 0 for p in branch.encoder.block(POSITION).parameters())
    assert sum(calls.values()) + 1 == tree.blocks_per_forward()  # + the LoRA block copy


@torch.no_grad()
def test_save_load_round_trip(runs, tmp_path):
    images = _images()
    tree = _tree(runs)
    expected = tree(images)
    tree.save(tmp_path / "tree")
    files = sorted(p.name for p in (tmp_path / "tree").iterdir())
    assert files == sorted(["tree.json"] + [f"stitch-{name}.safetensors" for name in BRANCHES])
    described = json.loads((tmp_path / "tree" / "tree.json").read_text())
    assert described["trunk"]["fingerprint"] == tree.trunk.fingerprint
    assert [b["stitch"]["kind"] for b in described["branches"]] == list(BRANCHES.values())
    assert described["branches"][0]["provenance"]["run_dir"] == str(runs["clip-tiny"])
    loaded = VFMStitchTree.load(tmp_path / "tree")
    got = loaded(images)
    for name in tree.names:
        assert torch.equal(got[name][0], expected[name][0]), name
        assert torch.equal(got[name][1], expected[name][1]), name
    with pytest.raises(TreeError, match="already holds a tree"):
        tree.save(tmp_path / "tree")


def _modified_weights(name: str, path) -> str:
    encoder = featcache.load_encoder(name)
    state = {k: v.clone().contiguous() for k, v in encoder.module.state_dict().items()}
    key = next(k for k in state if k.endswith("norm.weight") or k.endswith("ln_post.weight"))
    state[key][0] += 1.0
    save_file(state, str(path))
    return str(path)


def test_mismatched_fingerprints_and_positions_are_refused(runs, tmp_path):
    run_dir = runs["clip-tiny"]
    other = featcache.load_encoder(
        TRUNK, weights=_modified_weights(TRUNK, tmp_path / "d.safetensors")
    )
    with pytest.raises(TreeError) as info:
        VFMStitchTree.from_runs(other, POSITION, [run_dir])
    message = str(info.value)
    assert str(run_dir) in message and other.fingerprint in message
    assert featcache.load_encoder(TRUNK).fingerprint in message

    trunk = featcache.load_encoder(TRUNK)
    with pytest.raises(TreeError, match=f"{run_dir} stitches at position {POSITION}"):
        VFMStitchTree.from_runs(trunk, POSITION + 1, [run_dir])
    with pytest.raises(TreeError, match="Two outputs named 'clip-tiny'"):
        VFMStitchTree.from_runs(trunk, POSITION, [run_dir, run_dir])
    named = VFMStitchTree.from_runs(trunk, POSITION, [("a", run_dir), ("b", run_dir)])
    assert named.names == [TRUNK, "a", "b"]

    # a saved tree whose branch encoder now loads with other weights
    named.save(tmp_path / "tree")
    weights = {"clip-tiny": _modified_weights("clip-tiny", tmp_path / "c.safetensors")}
    with pytest.raises(TreeError, match="branch 'a'.*fingerprint") as info:
        VFMStitchTree.load(tmp_path / "tree", weights=weights)
    assert featcache.load_encoder("clip-tiny").fingerprint in str(info.value)


def test_paper_table13_formula():
    expected = {  # Table 13, in percent (L = 23); the paper rounds 36/23 = 156.5% down
        2: [100, 74, 39, 4],
        3: [200, 148, 78, 9],
        4: [300, 222, 117, 13],
        5: [400, 296, 156, 17],
    }
    for k, row in expected.items():
        got = [100 * additional_cost(k, n, 23) for n in (0, 6, 14, 22)]
        assert got == pytest.approx(row, abs=0.6), k


def test_cost_table_matches_formula_on_tiny_encoders():
    """Four encoders of one architecture: counted block FLOPs give exactly (k-1)(L-n)/L."""
    config = BenchConfig(
        encoders=[TRUNK] * 4,
        positions=(2, 5),
        batch_sizes=(1,),
        warmup=0,
        repeats=1,
        device="cpu",
    )
    result = run_bench(config)
    depth = featcache.load_encoder(TRUNK).depth
    assert result["readout_layer"] == depth  # by default every encoder is read at layer N
    systems = {s["system"]: s for s in result["systems"]}
    block_share = systems["naive"]["trunk_block_gflops"] / systems["naive"]["trunk_gflops"]
    assert 0.9 < block_share < 1
    assert list(systems) == ["naive", "VST-2", "VST-5"]
    assert (
        systems["naive"]["params_m"] > systems["VST-2"]["params_m"] > systems["VST-5"]["params_m"]
    )
    assert systems["naive"]["gflops"] > systems["VST-2"]["gflops"] > systems["VST-5"]["gflops"]
    for system in systems.values():
        assert set(system["by_batch"]) == {"1"}
        assert all(m["latency_ms"] > 0 and m["memory_mb"] > 0 for m in system["by_batch"].values())
    for row in result["cost"]:
        n = row["position"] or 0
        assert row["formula"] == pytest.approx(additional_cost(4, n, depth))
        assert row["blocks_run"] == depth + 3 * (depth - n)
        assert row["blocks_extra"] == pytest.approx(row["formula"], abs=1e-12)
        assert row["block_flops_extra"] == pytest.approx(row["formula"], abs=1e-12)
        # all FLOPs: relative to the trunk's whole forward (its patch embedding included), plus
        # the stitches; dinov2's norms and CLS pool count no matmul FLOPs
        beyond_stitches = row["total_flops_extra"] - row["stitch_share"]
        share = 1.0 if n == 0 else block_share  # naive: the branches embed their images too
        assert beyond_stitches == pytest.approx(row["formula"] * share, rel=1e-9)
        assert "paper_formula" not in row  # L is the readout layer (--readout-layer), one source

    lora = run_bench(
        BenchConfig(
            encoders=[TRUNK] * 3,
            positions=(3,),
            batch_sizes=(1,),
            warmup=0,
            repeats=1,
            device="cpu",
            stitch="lora",
        )
    )
    row = lora["cost"][1]  # LoRA branches specialise blocks n..N: 2 (L - n + 1) / L
    assert row["formula"] == pytest.approx(2 * (depth - 3 + 1) / depth)
    assert row["blocks_extra"] == pytest.approx(row["formula"], abs=1e-12)
    # each LoRA block copy also forms W + (alpha/r) B A once per forward: 2 r out in FLOPs per
    # linear weight (rank 8), on top of the formula's blocks
    block = featcache.load_encoder(TRUNK).block(3)
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    delta = 2 * sum(2 * 8 * m.in_features * m.out_features for m in linears)
    trunk_blocks = lora["systems"][0]["trunk_block_gflops"] * 1e9
    expected = row["formula"] + delta / trunk_blocks
    assert row["block_flops_extra"] == pytest.approx(expected, rel=1e-9)


def test_cli_build_and_bench(runs, tmp_path):
    out = tmp_path / "tree"
    args = ["tree", "build", "--trunk", TRUNK, "--position", str(POSITION), "--out", str(out)]
    branches = ["--branch", f"clip={runs['clip-tiny']}", "--branch", str(runs["siglip2-tiny"])]
    result = runner.invoke(cli, args + branches)
    assert result.exit_code == 0, result.output
    assert "clip" in result.output and (out / "tree.json").is_file()
    assert VFMStitchTree.load(out).names == [TRUNK, "clip", "siglip2-tiny"]

    result = runner.invoke(
        cli,
        [
            "tree",
            "bench",
            str(out),
            "--batch-sizes",
            "1,2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--positions",
            "2,4",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output[result.output.index("{") :])
    assert [s["system"] for s in bench["systems"]] == ["naive", "VST-2", "VST-4"]
    assert [e["role"] for e in bench["encoders"]] == ["trunk", "branch", "branch"]
    assert bench["cost"][1]["blocks_run"] == 6 + 2 * (6 - POSITION)

    result = runner.invoke(
        cli,
        [
            "tree",
            "bench",
            "--encoder",
            TRUNK,
            "--encoder",
            "clip-tiny",
            "--positions",
            "3",
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Table 5" in result.output and "Table 13" in result.output and "VST-3" in result.output

    # read at layer 4 (--readout-layer): recorded in tree.json, branches run blocks 3..4
    readout = ["--readout-layer", "4", "--out", str(tmp_path / "tree-4")]
    result = runner.invoke(cli, args[:5] + [str(POSITION)] + readout + branches)
    assert result.exit_code == 0, result.output
    assert "1..4" in result.output and "3..4" in result.output and "layer 4" in result.output
    assert json.loads((tmp_path / "tree-4" / "tree.json").read_text())["readout_layer"] == 4
    assert VFMStitchTree.load(tmp_path / "tree-4").readout_layer == 4

    result = runner.invoke(cli, args[:5] + ["1", "--out", str(tmp_path / "bad")] + branches)
    assert result.exit_code == 2
    assert "stitches at position 2" in result.output
    result = runner.invoke(cli, ["tree", "bench", "--encoder", TRUNK, "--positions", "2"])
    assert result.exit_code == 2 and "at least two --encoder" in result.output
