"""Every bad value given to a command is a one-line error naming it: exit status 2, no traceback.

Each case gives the other options valid-looking values (a real image manifest, existing
directories) so that the bad value is what fails; none of them loads a model.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app

runner = CliRunner()

F, S = "featcache", "stitchtrain"
APPS = {F: featcache_app, S: stitchtrain_app}

EXTRACT = ["extract", "--model", "dinov2-tiny", "--data", "{manifest}", "--layers", "1,3"]
EXTRACT += ["--out", "{tmp}/out"]
FIT = ["fit", "--source", "{tmp}/a.zarr", "--target", "{tmp}/b.zarr", "--position", "3"]
FIT += ["--out", "{tmp}/run"]
PROBE = ["probe", "--store", "{tmp}/a.zarr", "--out", "{tmp}/probe"]
SWEEP = ["sweep", "{tmp}/sweep.toml", "--out", "{tmp}/sweep"]
REPORT = ["report", "{tmp}/sweep", "--out", "{tmp}/report"]
CKA = ["cka", "{tmp}/a.zarr", "{tmp}/b.zarr", "--out", "{tmp}/cka"]
TRANSFER = ["transfer", "{tmp}/run", "--source", "{tmp}/a.zarr", "--target", "{tmp}/b.zarr"]
TRANSFER += ["--out", "{tmp}/transfer"]
BUILD = ["tree", "build", "--trunk", "dinov2-tiny", "--position", "2", "--branch", "{tmp}/run"]
BUILD += ["--out", "{tmp}/tree"]
BENCH = ["tree", "bench", "--encoder", "dinov2-tiny", "--encoder", "siglip2-tiny"]
BENCH += ["--positions", "2"]
FILE = "{tmp}/file.txt"  # an existing regular file

# (app, arguments, texts the error must contain, joined by " ... ": the bad value, and the
# option's name where the message can name both)
CASES = {
    # featcache extract
    "extract-shard-size-0": (F, [*EXTRACT, "--shard-size", "0"], "--shard-size ... Got 0 instead"),
    "extract-shard-size-neg": (
        F,
        [*EXTRACT, "--shard-size", "-4"],
        "--shard-size ... Got -4 instead",
    ),
    "extract-shard-size-text": (F, [*EXTRACT, "--shard-size", "big"], "--shard-size"),
    "extract-batch-size-0": (F, [*EXTRACT, "--batch-size", "0"], "--batch-size ... Got 0 instead"),
    "extract-num-workers-neg": (
        F,
        [*EXTRACT, "--num-workers", "-1"],
        "--num-workers ... Got -1 instead",
    ),
    "extract-dtype-int8": (F, [*EXTRACT, "--dtype", "int8"], "int8"),
    "extract-dtype-fp16": (F, [*EXTRACT, "--dtype", "fp16"], "fp16"),
    "extract-compression-bitround0": (F, [*EXTRACT, "--compression", "bitround:0"], "bitround:0"),
    "extract-compression-bitround11": (
        F,
        [*EXTRACT, "--compression", "bitround:11"],
        "bitround:11",
    ),
    "extract-compression-bitroundx": (F, [*EXTRACT, "--compression", "bitround:x"], "bitround:x"),
    "extract-compression-gzip": (F, [*EXTRACT, "--compression", "gzip"], "gzip"),
    "extract-bitround-not-float16": (
        F,
        [*EXTRACT, "--compression", "bitround:4", "--dtype", "float32"],
        "float32",
    ),
    "extract-tokens-some": (F, [*EXTRACT, "--tokens", "some"], "some"),
    "extract-tokens-cls": (F, [*EXTRACT, "--tokens", "cls"], "'cls'"),
    "extract-on-bad-image": (F, [*EXTRACT, "--on-bad-image", "ignore"], "ignore"),
    "extract-device-tpu": (F, [*EXTRACT, "--device", "tpu"], "'tpu'"),
    "extract-device-cuda-x": (F, [*EXTRACT, "--device", "cuda:x"], "cuda:x"),
    "extract-weights-no-equals": (F, [*EXTRACT, "--weights", "dinov2-tiny"], "dinov2-tiny"),
    "extract-weights-no-name": (F, [*EXTRACT, "--weights", "=w.safetensors"], "=w.safetensors"),
    "extract-layers-empty": (F, [*EXTRACT, "--layers", ""], "--layers"),
    "extract-layers-commas": (F, [*EXTRACT, "--layers", ",,"], "',,'"),
    "extract-layers-text": (F, [*EXTRACT, "--layers", "2,x"], "2,x"),
    "extract-layers-negative": (F, [*EXTRACT, "--layers=-7"], "-7 in --layers '-7'"),
    "extract-shard-text": (F, [*EXTRACT, "--shard", "first"], "first"),
    "extract-shard-range": (F, [*EXTRACT, "--shard", "2/2"], "2/2"),
    "extract-scheduler-local-x": (F, [*EXTRACT, "--scheduler", "local:x"], "local:x"),
    "extract-out-is-file": (F, [*EXTRACT[:-1], FILE], "file.txt"),
    # other featcache commands
    "featcache-demo-out-is-file": (F, ["demo", "--out", FILE], "file.txt"),
    "ls-missing-root": (F, ["ls", "{tmp}/missing"], "missing"),
    "info-missing-store": (F, ["info", "{tmp}/missing.zarr"], "missing.zarr"),
    "rm-not-a-store": (F, ["rm", "{tmp}/sweep"], "sweep"),
    # stitchtrain fit
    "fit-memory-budget": (S, [*FIT, "--memory-budget", "lots"], "lots"),
    "fit-checkpoint-every-negative": (
        S,
        [*FIT, "--checkpoint-every=-1"],
        "--checkpoint-every >= 0 seconds ... -1",
    ),
    "fit-checkpoint-every-nan": (S, [*FIT, "--checkpoint-every", "nan"], "nan"),
    "fit-stitch": (S, [*FIT, "--stitch", "conv"], "conv"),
    "fit-objective": (S, [*FIT, "--objective", "mse"], "mse"),
    "fit-task": (S, [*FIT, "--task", "det"], "det"),
    "fit-init": (S, [*FIT, "--init", "zeros"], "zeros"),
    "fit-lr-empty": (S, [*FIT, "--lr", ""], "--lr"),
    "fit-lr-text": (S, [*FIT, "--lr", "1e-3,abc"], "1e-3,abc"),
    "fit-lr-negative": (S, [*FIT, "--lr=-1e-3"], "-1e-3"),
    "fit-lr-zero": (S, [*FIT, "--lr", "0"], "'0'"),
    "fit-lr-nan": (S, [*FIT, "--lr", "nan"], "nan"),
    "fit-position-negative": (
        S,
        [*FIT[:5], "--position=-1", *FIT[7:]],
        "--position ... Got -1 instead",
    ),
    "fit-position-zero": (S, [*FIT[:6], "0", *FIT[7:]], "--position ... Got 0 instead"),
    "fit-position-text": (S, [*FIT[:6], "three", *FIT[7:]], "--position"),
    "fit-epochs-0": (S, [*FIT, "--epochs", "0"], "--epochs ... Got 0 instead"),
    "fit-patience-0": (S, [*FIT, "--patience", "0"], "--patience ... Got 0 instead"),
    "fit-batch-size-0": (S, [*FIT, "--batch-size", "0"], "--batch-size ... Got 0 instead"),
    "fit-val-fraction": (S, [*FIT, "--val-fraction", "1.5"], "1.5"),
    "fit-device-tpu": (S, [*FIT, "--device", "tpu"], "'tpu'"),
    "fit-out-is-file": (S, [*FIT[:-1], FILE], "file.txt"),
    # probe, eval, positions, demo
    "probe-lr": (S, [*PROBE, "--lr", "fast"], "fast"),
    "probe-epochs-0": (S, [*PROBE, "--epochs", "0"], "--epochs ... Got 0 instead"),
    "probe-patience-neg": (S, [*PROBE, "--patience", "-2"], "--patience ... Got -2 instead"),
    "probe-out-is-file": (S, [*PROBE[:-1], FILE], "file.txt"),
    "eval-missing-run": (S, ["eval", "{tmp}/missing-run"], "missing-run"),
    "positions-unknown-model": (S, ["positions", "dinov2-tny", "siglip2-tiny"], "dinov2-tny"),
    "positions-unknown-target": (S, ["positions", "dinov2-tiny", "vit-huge-x"], "vit-huge-x"),
    "stitchtrain-demo-epochs-0": (
        S,
        ["demo", "--out", "{tmp}/demo", "--epochs", "0"],
        "--epochs ... Got 0 instead",
    ),
    "stitchtrain-demo-out-is-file": (S, ["demo", "--out", FILE], "file.txt"),
    # sweep, report, cka, predictions, transfer
    "sweep-scheduler": (S, [*SWEEP, "--scheduler", "cluster"], "cluster"),
    "sweep-scheduler-local-0": (S, [*SWEEP, "--scheduler", "local:0"], "local:0"),
    "sweep-missing-config": (S, ["sweep", "{tmp}/nope.toml", "--out", "{tmp}/s"], "nope.toml"),
    "sweep-out-is-file": (S, [*SWEEP[:-1], FILE], "file.txt"),
    "report-cka-max-images-0": (
        S,
        [*REPORT, "--cka-max-images", "0"],
        "--cka-max-images ... Got 0 instead",
    ),
    "report-out-is-file": (S, [*REPORT[:-1], FILE], "file.txt"),
    "cka-tokens": (S, [*CKA, "--tokens", "sum"], "sum"),
    "cka-layers": (S, [*CKA, "--layers", "2,x"], "'x'"),
    "cka-layers-b": (S, [*CKA, "--layers-b", "last"], "last"),
    "cka-minibatch-2": (S, [*CKA, "--minibatch", "2"], "--minibatch"),
    "cka-max-images-0": (S, [*CKA, "--max-images", "0"], "--max-images ... Got 0 instead"),
    "cka-out-is-file": (S, [*CKA[:-1], FILE], "file.txt"),
    "predictions-missing-run": (S, ["predictions", "{tmp}/gone", "{tmp}/x", "{tmp}/y"], "gone"),
    "transfer-lr": (S, [*TRANSFER, "--lr", "1e-3;1e-2"], "1e-3;1e-2"),
    "transfer-epochs-0": (S, [*TRANSFER, "--epochs", "0"], "--epochs ... Got 0 instead"),
    "transfer-device-tpu": (S, [*TRANSFER, "--device", "tpu"], "'tpu'"),
    "transfer-out-is-file": (S, [*TRANSFER[:-1], FILE], "file.txt"),
    # tree build / bench
    "tree-build-position-0": (S, [*BUILD[:4], "--position", "0", *BUILD[6:]], "--position"),
    "tree-build-device-tpu": (S, [*BUILD, "--device", "tpu"], "'tpu'"),
    "tree-build-weights": (S, [*BUILD, "--weights", "dinov2-tiny"], "dinov2-tiny"),
    "tree-build-out-is-file": (S, [*BUILD[:-1], FILE], "file.txt"),
    "tree-bench-positions-text": (S, [*BENCH[:-1], "2,x"], "2,x"),
    "tree-bench-positions-0": (S, [*BENCH[:-1], "0"], "--positions"),
    "tree-bench-batch-sizes-0": (S, [*BENCH, "--batch-sizes", "0"], "--batch-sizes"),
    "tree-bench-batch-sizes-text": (S, [*BENCH, "--batch-sizes", "1,b"], "1,b"),
    "tree-bench-warmup-neg": (S, [*BENCH, "--warmup", "-1"], "--warmup ... Got -1 instead"),
    "tree-bench-repeats-0": (S, [*BENCH, "--repeats", "0"], "--repeats ... Got 0 instead"),
    "tree-bench-precision": (S, [*BENCH, "--precision", "fp8"], "fp8"),
    "tree-bench-device-tpu": (S, [*BENCH, "--device", "tpu"], "'tpu'"),
    "tree-bench-stitch": (S, [*BENCH, "--stitch", "conv"], "conv"),
    "tree-bench-formula-depth-0": (
        S,
        [*BENCH, "--formula-depth", "0"],
        "--formula-depth ... Got 0 instead",
    ),
    "tree-bench-weights": (S, [*BENCH, "--weights", "siglip2-tiny"], "siglip2-tiny"),
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from featcache.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("images"), num_classes=2, per_class=2)


@pytest.fixture()
def places(tmp_path, manifest):
    for name in ("a.zarr", "b.zarr", "run", "sweep"):
        (tmp_path / name).mkdir()
    (tmp_path / "file.txt").write_text("not a directory\n")
    (tmp_path / "sweep.toml").write_text(
        'dataset = "shapes"\n[stores]\na = "a.zarr"\nb = "b.zarr"\n'
        '[grid]\npairs = [["a", "b"]]\npositions = [2]\nobjectives = ["ffm"]\n'
    )
    return {"tmp": str(tmp_path), "manifest": str(manifest)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_value_is_a_one_line_error(case, places):
    app, args, expected = CASES[case]
    args = [arg.format(**places) for arg in args]
    result = runner.invoke(APPS[app], args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    flat = " ".join(result.output.replace("│", " ").split())  # rich boxes wrap long lines
    for part in expected.split(" ... "):  # the option and the value given, where both apply
        assert part in flat, result.output
    assert "Traceback" not in result.output
    ours = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 or "Invalid value for" in result.output, result.output  # or click's


def test_layers_empty_is_refused_by_the_library(tmp_path, manifest):
    from featcache.errors import FeatcacheError
    from featcache.extract import ExtractConfig

    with pytest.raises(FeatcacheError, match="--layers"):
        ExtractConfig(models=["dinov2-tiny"], data=str(manifest), out=str(tmp_path), layers=[])
    pooled = ExtractConfig(
        models=["dinov2-tiny"], data=str(manifest), out=str(tmp_path), layers=[], tokens="pooled"
    )
    assert pooled.layers == []


def test_resolve_device_names_what_it_accepts():
    from featcache.errors import FeatcacheError
    from featcache.extract import resolve_device

    with pytest.raises(FeatcacheError, match=r"auto, cpu, cuda or cuda:N\. Got 'tpu' instead"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"


def _corrupt_zarr_json(tmp_path):
    store = tmp_path / "broken.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{not json")
    return store


def _missing_zarr_json(tmp_path):
    store = tmp_path / "empty.zarr"
    store.mkdir()
    return store


def _not_featcache(tmp_path):
    store = tmp_path / "plain.zarr"
    store.mkdir()
    (store / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    )
    return store


@pytest.mark.parametrize("make", [_corrupt_zarr_json, _missing_zarr_json, _not_featcache])
@pytest.mark.parametrize("as_json", [True, False])
def test_verify_reports_unopenable_store_as_a_fault(tmp_path, make, as_json):
    store = str(make(tmp_path))
    result = runner.invoke(featcache_app, ["verify", store, *(["--json"] if as_json else [])])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    if as_json:
        payload = json.loads(result.stdout)
        assert payload["store"] == store and payload["ok"] is False
        assert len(payload["faults"]) == 1 and store in payload["faults"][0]
    else:
        assert "fault:" in result.output and store in result.output


def test_help_shows_accepted_values():
    extract_help = runner.invoke(featcache_app, ["extract", "--help"]).output
    for choice in ("float16", "bfloat16", "prefix", "pooled", "bitround:K", "skip"):
        assert choice in extract_help
    fit_help = runner.invoke(stitchtrain_app, ["fit", "--help"]).output
    for choice in ("lora", "ffm+tlt", "seg", "lstsq", "--allow-incomplete"):
        assert choice in fit_help


def test_fit_passes_allow_incomplete(tmp_path, monkeypatch):
    import stitchtrain.pipeline.fit as fit_module

    if "allow_incomplete" not in {f.name for f in dataclasses.fields(fit_module.FitConfig)}:
        pytest.skip("FitConfig has no allow_incomplete field yet")
    seen = {}

    def fake_fit(config, progress, **kwargs):
        seen["config"] = config
        return {"test_accuracy": 1.0}

    monkeypatch.setattr(fit_module, "fit", fake_fit)
    args = [arg.format(tmp=tmp_path) for arg in FIT]
    for flag, expected in (([], False), (["--allow-incomplete"], True)):
        result = runner.invoke(stitchtrain_app, [*args, *flag, "--json"])
        assert result.exit_code == 0, result.output
        assert seen["config"].allow_incomplete is expected


def test_cli_choices_are_the_library_choices():
    from typing import get_args

    import cli.experiments_app as experiments
    import cli.extract_app as featcache
    import cli.stitchtrain_app as stitchtrain
    import cli.tree_app as tree
    from featcache.store import DTYPES, TOKEN_MODES
    from stitchtrain.model.stitches import STITCH_KINDS
    from stitchtrain.studies.cka import TOKEN_MODES as CKA_TOKENS
    from stitchtrain.train.config import INITS, OBJECTIVES, STITCHES
    from stitchtrain.tree.bench_config import PRECISIONS

    pairs = [
        (featcache.Tokens, TOKEN_MODES),
        (featcache.Dtype, DTYPES),
        (stitchtrain.Stitch, STITCHES),
        (stitchtrain.Objective, OBJECTIVES),
        (stitchtrain.Init, INITS),
        (experiments.CkaTokens, CKA_TOKENS),
        (tree.Precision, PRECISIONS),
        (tree.Stitch, STITCH_KINDS),
    ]
    for literal, accepted in pairs:
        assert get_args(literal) == tuple(accepted)
