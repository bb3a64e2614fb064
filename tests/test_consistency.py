"""The commands agree with each other and say what they mean (issue 12, "Consistency").

One rule for stitch positions in ``positions``, ``fit`` and ``sweep``; ``ls`` of a missing root
is an error; ``info`` is a short summary; the size estimate before extraction counts every
array written; ``--version`` and shell completion on both apps; brackets in messages print as
written; ``fit --lr`` and the sweep key ``lrs`` take either spelling; sizes and latencies come
from dask and ``torch.utils.benchmark``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.demo_data import make_demo_dataset
from featcache.encoders import PRESETS, describe_preset, preset_summary
from featcache.extract import ExtractConfig, plan_extraction, run_extraction
from featcache.store import FeatureStore
from stitchtrain.data.positions import PositionError, valid_positions
from stitchtrain.studies.sweep.grid import plan_sweep

runner = CliRunner()
MODELS = ("dinov2-tiny", "siglip2-tiny")  # both 6 blocks deep: positions 1..5
RANGE_ERROR = "Expected a stitch position in 1..5 for dinov2-tiny -> siglip2-tiny"


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Both tiny encoders, train and test splits of 3 classes x 8 images (with masks), layers 5
    and 6, shards of 8 (the last one partial). Returns (root, {(model, split): url},
    {(model, split): estimated bytes before extraction})."""
    root = tmp_path_factory.mktemp("consistency")
    manifest = make_demo_dataset(root / "data", num_classes=3, per_class=8)
    urls, estimates = {}, {}
    for split in ("train", "test"):
        config = ExtractConfig(
            models=list(MODELS),
            data=str(manifest),
            out=str(root / "stores"),
            layers=[5, 6],
            split=split,
            shard_size=8,
        )
        plan = plan_extraction(config)
        for model, spec, url in zip(MODELS, plan.specs, plan.urls, strict=True):
            urls[model, split] = url
            estimates[model, split] = plan.estimated_bytes(spec)
        run_extraction(plan)
    return root, urls, estimates


def _fit_args(urls, position: int, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--source",
        urls["dinov2-tiny", "train"],
        "--target",
        urls["siglip2-tiny", "train"],
        "--position",
        str(position),
        "--objective",
        "ffm",
        "--out",
        str(out),
        "--dry-run",
        "--json",
        *extra,
    ]


def _sweep_config(root: Path, urls, grid: str, fit: str = "epochs = 1") -> Path:
    path = root / "sweep.toml"
    path.write_text(
        f'[stores]\ndinov2 = "{urls["dinov2-tiny", "train"]}"\n'
        f'siglip2 = "{urls["siglip2-tiny", "train"]}"\n'
        f'[grid]\npairs = [["dinov2", "siglip2"]]\nobjectives = ["ffm"]\n{grid}\n[fit]\n{fit}\n'
    )
    return path


def _one_line(output: str) -> str:
    """The CLI's error line (``error: ...``), unwrapped."""
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


# -- stitch positions: one rule --------------------------------------------------------------
def test_valid_positions_leave_at_least_one_target_block():
    assert valid_positions(6, 6) == range(1, 6)
    assert valid_positions(24, 12) == range(1, 12)  # bounded by the target's tail
    assert valid_positions(4, 24) == range(1, 5)  # bounded by the source's blocks
    assert list(valid_positions(6, 1)) == []


def test_positions_fit_and_sweep_agree_on_the_range(extracted, tmp_path):
    root, urls, _ = extracted
    shown = runner.invoke(stitchtrain_app, ["positions", *MODELS])
    assert shown.exit_code == 0, shown.output
    assert "stitch positions: 1..5" in shown.output

    # the last valid position plans; n = N_target (layer 6 is stored) and beyond are refused
    result = runner.invoke(stitchtrain_app, _fit_args(urls, 5, tmp_path / "n5"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stages"] == ["ffm"]
    for position in (6, 9):
        result = runner.invoke(stitchtrain_app, _fit_args(urls, position, tmp_path / "n"))
        assert result.exit_code == 2, result.output
        line = _one_line(result.output)
        assert line.startswith(f"error: {RANGE_ERROR}") and line.endswith(
            f"Got {position} instead."
        )

    config = _sweep_config(root, urls, "positions = [5, 6]")
    with pytest.raises(PositionError, match=RANGE_ERROR):  # before any point runs
        plan_sweep({**_load(config)}, base=root)
    result = runner.invoke(
        stitchtrain_app, ["sweep", str(config), "--out", str(tmp_path / "s"), "--dry-run"]
    )
    assert result.exit_code == 2, result.output
    assert _one_line(result.output).startswith(f"error: {RANGE_ERROR}")
    assert "Got 6 instead." in result.output
    config = _sweep_config(root, urls, "positions = [5]")
    assert {p.position for p in plan_sweep(_load(config), base=root).points} == {None, 5}


def _load(path: Path) -> dict:
    from stitchtrain.studies.sweep.config import load_sweep_config

    return load_sweep_config(path)


def test_preset_facts_need_no_model_and_match_the_built_one():
    """``featcache models`` / ``stitchtrain positions`` read the presets' stated architecture
    (torch-free); every one equals the model as its library builds it (meta device)."""
    for name in PRESETS:
        built = describe_preset(name)
        assert preset_summary(name) == {key: built[key] for key in preset_summary(name)}, name


# -- ls, info, size estimate -----------------------------------------------------------------
def test_ls_of_a_missing_root_is_an_error(tmp_path):
    missing = tmp_path / "nonexistent"
    result = runner.invoke(featcache_app, ["ls", str(missing)])
    assert result.exit_code == 2
    assert _one_line(result.output) == (
        f"error: Expected ROOT to be a directory or URL. Got {missing}, which is absent."
    )


def test_info_prints_a_summary_and_json_on_request(extracted):
    _, urls, _ = extracted
    url = urls["dinov2-tiny", "train"]
    result = runner.invoke(featcache_app, ["info", url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) < 20, result.output
    for name in ("encoder", "dataset", "split", "layers", "images", "size", "complete"):
        assert any(line.split("│")[1].strip() == name for line in lines if "│" in line), name
    assert "dinov2-tiny" in result.output and "5,6" in result.output
    assert "18 readable, 0 skipped" in result.output and "yes (3/3 shards)" in result.output
    assert "112x112 input" in result.output and "grid 8x8" in result.output
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.output)
    result = runner.invoke(featcache_app, ["info", url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["summary"]["images"] == 18


def test_size_estimate_counts_every_array_written(extracted):
    """Estimated before extraction vs bytes on disk, within 5% (masks are about 40% here)."""
    _, urls, estimates = extracted
    for key, url in urls.items():
        store = FeatureStore.open(url)
        assert "masks" in store.group
        written = sum(
            os.path.getsize(os.path.join(folder, name))
            for folder, _, names in os.walk(url)
            for name in names
        )
        assert abs(estimates[key] - written) <= 0.05 * written, (key, estimates[key], written)


# -- version, completion, brackets ------------------------------------------------------------
@pytest.mark.parametrize("app", [featcache_app, stitchtrain_app])
def test_version_and_shell_completion_on_both_apps(app):
    import featcache

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == featcache.__version__
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_brackets_in_messages_print_as_written(extracted, tmp_path):
    root, urls, _ = extracted
    config = _sweep_config(root, urls, "position = [2]")
    result = runner.invoke(stitchtrain_app, ["sweep", str(config), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert _one_line(result.output).startswith(
        "error: Unknown key(s) ['position'] in sweep config [grid]. Accepted: "
    )
    config = tmp_path / "no-stores.toml"
    config.write_text("[grid]\npositions = [2]\n")
    result = runner.invoke(stitchtrain_app, ["sweep", str(config), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert _one_line(result.output).startswith("error: Expected a [stores] table naming each")
    folder = tmp_path / "[stores]"  # a table title and a cell
    folder.mkdir()
    result = runner.invoke(featcache_app, ["ls", str(folder)])
    # the title names the folder as written; rich wraps it to the table's width, which depends
    # on the path's length, so compare with the line breaks and padding taken out
    assert result.exit_code == 0 and str(folder) in "".join(result.output.split())


# -- one spelling for the learning-rate grid --------------------------------------------------
def test_lr_and_lrs_are_one_setting_in_fit_and_sweep(extracted, tmp_path):
    root, urls, _ = extracted
    for option in ("--lr", "--lrs"):
        args = _fit_args(urls, 5, tmp_path / option, option, "0.005,0.01")
        result = runner.invoke(stitchtrain_app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["lrs"] == [0.005, 0.01]
    for fit in ("lrs = [0.005]", "lr = [0.005]", "lr = 0.005"):
        plan = plan_sweep(_load(_sweep_config(root, urls, "positions = [5]", fit)), base=root)
        assert {tuple(p.config["lrs"]) for p in plan.points} == {(0.005,)}, fit
    config = _sweep_config(root, urls, "positions = [5]", "lr = [0.005]\nlrs = [0.01]")
    result = runner.invoke(stitchtrain_app, ["sweep", str(config), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert _one_line(result.output) == (
        "error: Expected one of [fit] lr and lrs (one setting, two spellings). Got both."
    )
    result = runner.invoke(stitchtrain_app, ["fit", "--help"])
    assert "lrs or lr" in " ".join(result.output.split())


# -- sizes and latencies from the libraries ---------------------------------------------------
def test_sizes_are_dask_s(extracted):
    from dask.utils import format_bytes, parse_bytes

    from stitchtrain.data.sizes import parse_size

    for text in ("512MB", "2GiB", "1.5 G", "800k", "4096", "5e3"):
        assert parse_size(text) == parse_bytes(text)
    for text in ("", "kB", "-5MB"):  # dask reads these (1, 1000, -5e6 bytes); a budget may not
        with pytest.raises(ValueError, match="Expected a size"):
            parse_size(text)
    root, urls, _ = extracted
    result = runner.invoke(featcache_app, ["ls", str(root / "stores")])
    assert result.exit_code == 0, result.output
    size = format_bytes(FeatureStore.open(urls["dinov2-tiny", "test"]).summary()["bytes"])
    assert size in result.output


def test_tree_bench_latency_has_a_median_and_a_spread():
    import torch

    from cli.tree_app import _latency_cell
    from stitchtrain.tree.measure import _latency

    weights = torch.randn(256, 256)
    measured = _latency(lambda: weights @ weights, torch.device("cpu"), warmup=1, repeats=5)
    assert measured["latency_ms"] > 0 and measured["latency_iqr_ms"] >= 0
    assert measured["latency_blocks"] >= 2  # a spread needs several timed blocks
    cell = _latency_cell(measured)
    assert cell == f"{measured['latency_ms']:.2f} ({measured['latency_iqr_ms']:.2f})"
