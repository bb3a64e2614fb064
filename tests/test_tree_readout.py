"""VFM Stitch Tree read at layer R (``readout_layer``), as an MLLM reads its encoders.

The paper reads layer 23 of a 24-block ViT-L (LLaVA's penultimate layer): VST-22 is one extra
layer, (k - 1)(R - n) / R = 1/23 = 4.3% for two encoders, and VST-14 is 9/23 = 39%. The tree
with readout R equals the stitched models cut at layer R; the bench counts the blocks it runs.
"""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

import featcache
import stitchtrain.tree.bench as tree_bench
from cli.tree_app import tree_app
from featcache.errors import FeatcacheError
from stitchtrain.model.stitches import build_stitch
from stitchtrain.tree.bench import run_bench
from stitchtrain.tree.bench_config import BenchConfig
from stitchtrain.tree.branch import TreeBranch
from stitchtrain.tree.cost import additional_cost
from stitchtrain.tree.errors import TreeError
from stitchtrain.tree.model import VFMStitchTree

TRUNK = "dinov2-tiny"
DEPTH = 6  # every tiny preset
# branch encoder -> stitch kind; dinov3 exercises the LoRA stitch (trunk layer n-1 + block n)
BRANCHES = {"clip-tiny": "mlp", "siglip2-tiny": "linear", "dinov3-tiny": "lora"}

runner = CliRunner()
cli = typer.Typer()
cli.add_typer(tree_app, name="tree")


def _branches(trunk, position: int, kinds=BRANCHES) -> list[TreeBranch]:
    """Branches with seeded random stitches (equality does not need trained ones)."""
    torch.manual_seed(0)
    branches = []
    for target, kind in kinds.items():
        encoder = featcache.load_encoder(target)
        stitch = build_stitch(
            kind,
            source=trunk.layout,
            target=encoder.layout,
            source_width=trunk.width,
            target_width=encoder.width,
            source_encoder=trunk if kind == "lora" else None,
            position=position,
            lora_rank=4,
        )
        branches.append(TreeBranch(target, encoder, stitch, position))
    return branches


def _tree(position: int, readout: int | None, **kwargs) -> VFMStitchTree:
    trunk = featcache.load_encoder(TRUNK)
    return VFMStitchTree(
        trunk, position, _branches(trunk, position), readout_layer=readout, **kwargs
    )


def _images(batch: int = 2) -> torch.Tensor:
    size = featcache.load_encoder(TRUNK).image_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))


def _blocks(encoder, tokens: torch.Tensor, n: int, readout: int) -> torch.Tensor:
    """Layer-n tokens -> layer-R tokens through the encoder's blocks n+1..R, one at a time."""
    for m in range(n + 1, readout + 1):
        tokens = encoder.run_block(m, tokens)
    return tokens


@torch.no_grad()
@pytest.mark.parametrize(("position", "readout"), [(2, 3), (2, 5), (4, 5)])
def test_readout_outputs_equal_stitched_models_cut_at_readout(position, readout):
    images = _images()
    tree = _tree(position, readout)
    assert tree.readout_layer == readout and not tree.reads_final
    outputs = tree(images)
    assert list(outputs) == tree.names == [TRUNK, *BRANCHES]
    trunk = featcache.load_encoder(TRUNK)
    assert torch.equal(outputs[TRUNK], trunk.run(images, upto=readout))
    for branch in tree.branches:
        lora = branch.is_lora
        source = trunk.run(images, upto=position - 1 if lora else position)
        stitched = branch.stitch(source)  # target layer-n layout (B, T, D)
        expected = _blocks(featcache.load_encoder(branch.name), stitched, position, readout)
        assert outputs[branch.name].shape == expected.shape
        assert torch.equal(outputs[branch.name], expected), branch.name


@torch.no_grad()
def test_readout_at_depth_is_todays_final_output():
    images = _images()
    default, explicit = _tree(2, None), _tree(2, DEPTH)
    assert default.readout_layer == explicit.readout_layer == DEPTH
    assert default.reads_final and explicit.reads_final
    got, expected = explicit(images), default(images)
    trunk_final, trunk_pooled = featcache.load_encoder(TRUNK)(images)
    assert torch.equal(expected[TRUNK][0], trunk_final)
    assert torch.equal(expected[TRUNK][1], trunk_pooled)
    for name in default.names:
        assert torch.equal(got[name][0], expected[name][0]), name
        assert torch.equal(got[name][1], expected[name][1]), name
    assert default.blocks_per_forward() == DEPTH + 3 * (DEPTH - 2) + 1  # + the LoRA block copy


@torch.no_grad()
def test_blocks_run_with_readout_and_pruned_tails():
    position, readout = 2, 4
    tree = _tree(position, readout, prune=True)
    calls: dict[tuple[str, int], int] = {}

    def counter(key):
        def hook(*_):
            calls[key] = calls.get(key, 0) + 1

        return hook

    encoders = {TRUNK: tree.trunk, **{b.name: b.encoder for b in tree.branches}}
    for name, encoder in encoders.items():
        for m in range(1, encoder.depth + 1):
            encoder.block(m).register_forward_hook(counter((name, m)))
    tree(_images(batch=3))
    trunk_run = [calls.get((TRUNK, m), 0) for m in range(1, DEPTH + 1)]
    assert trunk_run == [1] * readout + [0] * (DEPTH - readout)
    for branch in tree.branches:
        run = [calls.get((branch.name, m), 0) for m in range(1, DEPTH + 1)]
        assert run == [0] * position + [1] * (readout - position) + [0] * (DEPTH - readout)
        # pruned: blocks 1..n and R+1..N, which the tree never runs, hold no weights
        for m in [*range(1, position + 1), *range(readout + 1, DEPTH + 1)]:
            assert all(p.numel() == 0 for p in branch.encoder.block(m).parameters()), m
        assert all(p.numel() > 0 for p in branch.encoder.block(readout).parameters())
    lora_copies = sum(b.is_lora for b in tree.branches)
    assert sum(calls.values()) + lora_copies == tree.blocks_per_forward()
    assert tree.blocks_per_forward() == readout + 3 * (readout - position) + lora_copies


@torch.no_grad()
def test_readout_is_saved_and_loaded(tmp_path):
    images = _images()
    tree = _tree(2, 4)
    expected = tree(images)
    tree.save(tmp_path / "tree")
    path = tmp_path / "tree" / "tree.json"
    described = json.loads(path.read_text())
    assert described["readout_layer"] == 4
    loaded = VFMStitchTree.load(tmp_path / "tree")
    assert loaded.readout_layer == 4 and not loaded.reads_final
    got = loaded(images)
    for name in tree.names:
        assert torch.equal(got[name], expected[name]), name

    # a tree.json written before the readout layer existed reads layer N, as it did then
    del described["readout_layer"]
    path.write_text(json.dumps(described))
    old = VFMStitchTree.load(tmp_path / "tree")
    assert old.readout_layer == DEPTH and old.reads_final
    assert isinstance(old(images)[TRUNK], tuple)


@pytest.mark.parametrize(("position", "readout"), [(2, 2), (3, 2), (2, 7), (2, 0), (5, 5)])
def test_out_of_range_readout_is_refused_in_one_line(position, readout):
    with pytest.raises(TreeError) as info:
        _tree(position, readout)
    message = str(info.value)
    assert "\n" not in message
    assert f"Got {readout} instead" in message
    assert f"{position + 1}..{DEPTH}" in message


def test_bench_refuses_positions_at_or_after_the_readout():
    with pytest.raises(FeatcacheError) as info:  # refused before any encoder loads
        BenchConfig(encoders=[TRUNK, TRUNK], positions=(2, 4), readout_layer=4)
    message = str(info.value)
    assert "\n" not in message and "--readout-layer 4" in message and "(2, 4)" in message
    with pytest.raises(FeatcacheError, match=r"Got 7 instead") as info:
        run_bench(BenchConfig(encoders=[TRUNK, TRUNK], positions=(2,), readout_layer=7))
    assert "\n" not in str(info.value) and f"3..{DEPTH}" in str(info.value)


def _bench(k: int, positions, readout: int | None, **kwargs) -> dict:
    config = BenchConfig(
        encoders=[TRUNK] * k,
        positions=tuple(positions),
        batch_sizes=(1,),
        warmup=0,
        repeats=1,
        device="cpu",
        readout_layer=readout,
        **kwargs,
    )
    return run_bench(config)


def _check_counted(result: dict, k: int, readout: int) -> None:
    assert result["readout_layer"] == readout
    for row in result["cost"]:
        n = row["position"] or 0
        assert row["blocks_run"] == readout + (k - 1) * (readout - n)
        assert row["formula"] == (k - 1) * (readout - n) / readout == additional_cost(k, n, readout)
        assert row["blocks_extra"] == row["formula"]
        assert row["block_flops_extra"] == pytest.approx(row["formula"], abs=1e-12)


@pytest.mark.parametrize(("k", "positions", "readout"), [(2, (1, 3), 4), (4, (2, 4), 5)])
def test_counted_overhead_with_readout_equals_formula(k, positions, readout):
    _check_counted(_bench(k, positions, readout), k, readout)


@pytest.fixture()
def vit_l_depth(monkeypatch):
    """``tree bench`` loads 24-block (ViT-L depth) encoders of tiny width: dinov2-tiny, deeper."""
    load = tree_bench.load_encoder

    def deep(name, **kwargs):
        return load(name, depth=24, **kwargs)

    monkeypatch.setattr(tree_bench, "load_encoder", deep)


def test_paper_overheads_at_vit_l_depth(vit_l_depth):
    """Table 13 / section 6.2 with L = 23: two encoders 9/23 = 39% and 1/23 = 4.3%, and four
    encoders 27/23 = 117% and 3/23 = 13%, counted from the blocks the systems run."""
    two = _bench(2, (14, 22), 23)
    _check_counted(two, 2, 23)
    assert [row["blocks_extra"] for row in two["cost"][1:]] == [9 / 23, 1 / 23]
    assert [e["depth"] for e in two["encoders"]] == [24, 24]
    four = _bench(4, (14, 22), 23)
    _check_counted(four, 4, 23)
    assert [round(100 * row["blocks_extra"]) for row in four["cost"]] == [300, 117, 13]


def test_cli_bench_prints_paper_overheads_at_vit_l_depth(vit_l_depth):
    args = ["tree", "bench", "--encoder", TRUNK, "--encoder", TRUNK, "--readout-layer", "23"]
    args += ["--positions", "14,22", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1"]
    args += ["--device", "cpu"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.replace("│", " ").split())
    assert "read at layer L = 23" in flat
    rows = {line.split()[0]: line.split() for line in flat.split("VST-")[1:]}
    # system, blocks run, formula, blocks, block FLOPs, ...
    assert rows["14"][1:5] == ["32", "39.1%", "39.1%", "39.1%"]
    assert rows["22"][1:5] == ["24", "4.3%", "4.3%", "4.3%"]

    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output[result.output.index("{") :])
    assert bench["readout_layer"] == 23
    assert [row["blocks_extra"] for row in bench["cost"]] == [1.0, 9 / 23, 1 / 23]


def test_cli_readout_refusals():
    bench = ["tree", "bench", "--encoder", TRUNK, "--encoder", TRUNK, "--device", "cpu"]
    for extra, expected in [
        (["--positions", "2", "--readout-layer", "1"], "Got 1 instead"),
        (["--positions", "2,4", "--readout-layer", "4"], "--readout-layer 4"),
        (["--positions", "2", "--readout-layer", "7"], f"3..{DEPTH}"),
        (["--positions", "2", "--readout-layer", "4", "--formula-depth", "5"], "--formula-depth 5"),
    ]:
        result = runner.invoke(cli, [*bench, *extra])
        assert result.exit_code == 2, result.output
        flat = " ".join(result.output.replace("│", " ").split())
        assert expected in flat, result.output
        assert "Traceback" not in result.output
        ours = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(ours) == 1 or "Invalid value for" in result.output, result.output

    build = ["tree", "build", "--trunk", TRUNK, "--position", "4", "--readout-layer", "3"]
    result = runner.invoke(cli, [*build, "--branch", "no-such-run", "--out", "no-such-tree"])
    assert result.exit_code == 2, result.output
    ours = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "Got 3 instead" in ours[0], result.output


def test_cli_bench_of_a_saved_tree_reads_its_readout(tmp_path):
    _tree(2, 4).save(tmp_path / "tree")
    args = ["tree", "bench", str(tmp_path / "tree"), "--batch-sizes", "1", "--repeats", "1"]
    args += ["--warmup", "0", "--device", "cpu", "--json"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output[result.output.index("{") :])
    assert bench["readout_layer"] == 4
    # three branches, one LoRA (blocks n..R): 4 + 3 (4 - 2) + 1
    assert bench["cost"][1]["blocks_run"] == 4 + 3 * 2 + 1
    assert bench["cost"][1]["blocks_extra"] == bench["cost"][1]["formula"] == 7 / 4
    # --readout-layer overrides the tree's for the measurement
    result = runner.invoke(cli, [*args, "--readout-layer", "6"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output[result.output.index("{") :])
    assert bench["readout_layer"] == 6 and bench["cost"][1]["blocks_run"] == 6 + 3 * 4 + 1
    # --formula-depth, the old name of L in the formula, is now the readout layer
    result = runner.invoke(cli, [*args, "--formula-depth", "3"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output[result.output.index("{") :])
    assert bench["readout_layer"] == 3 and bench["cost"][1]["blocks_run"] == 3 + 3 * 1 + 1
