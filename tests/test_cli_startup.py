"""CLI start-up stays light: help, version, store commands and parse errors never import torch.

Each check runs in a fresh interpreter (this test process has torch loaded already), runs the
app as ``python -m`` would, and reports at exit which heavy libraries ``sys.modules`` holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_store_spec

from featcache.store import FeatureStore, StoreSpec

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "open_clip")
FIT = ["fit", "--source", "a", "--target", "b", "--position", "2", "--out", "o"]

# Runs cli.<app> with argv, printing the heavy modules loaded (JSON, last line) at exit,
# whatever the exit status.
_RUNNER = """
import atexit, json, runpy, sys
heavy = {heavy!r}
atexit.register(lambda: print("HEAVY=" + json.dumps([m for m in heavy if m in sys.modules])))
sys.argv = {argv!r}
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def _run(module: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    code = _RUNNER.format(heavy=HEAVY, argv=[module.rsplit(".", 1)[-1], *args], module=module)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("HEAVY=")]
    assert line, f"no report; stdout={done.stdout!r} stderr={done.stderr!r}"
    return done, json.loads(line[-1].removeprefix("HEAVY="))


def _spec() -> StoreSpec:
    return fake_store_spec(depth=2, width=4, num_images=6, classes=["a", "b"], shard_size=4)


def _make_store(path: Path) -> str:
    store = FeatureStore.create(str(path), _spec())
    rng = np.random.default_rng(0)
    for shard in range(store.num_shards):
        start, stop = store.shard_rows(shard)
        arrays = {
            name: rng.standard_normal((stop - start, *store.group[name].shape[1:])).astype(
                np.float32
            )
            for name in store.feature_arrays()
        }
        arrays["ids"] = np.array([f"a/{row:04d}.jpg" for row in range(start, stop)])
        arrays["labels"] = np.arange(start, stop, dtype=np.int64) % 2
        arrays["valid"] = np.ones(stop - start, bool)
        store.write_shard(shard, arrays, {"rows": [start, stop], "skipped": []})
    return str(path)


@pytest.mark.parametrize("module", ["cli.featcache_app", "cli.stitchtrain_app"])
def test_importing_an_app_loads_no_heavy_library(module):
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_importing_featcache_loads_no_heavy_library_until_the_encoder_api_is_used():
    code = (
        "import sys, featcache\n"
        f"heavy = {HEAVY!r}\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "assert callable(featcache.load_encoder) and 'dinov2-tiny' in featcache.PRESETS\n"
        "print(featcache.Preprocessing.__name__, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "Preprocessing True"]


@pytest.mark.parametrize(
    "module, args, status",
    [
        ("cli.featcache_app", ["--help"], 0),
        ("cli.featcache_app", ["--version"], 0),
        ("cli.featcache_app", [], 2),  # no_args_is_help
        ("cli.featcache_app", ["extrakt"], 2),  # a typo
        ("cli.featcache_app", ["extract", "--help"], 0),
        (
            "cli.featcache_app",
            ["extract", "--model", "x", "--data", "y", "--out", "z", "--dtype", "int8"],
            2,
        ),
        ("cli.stitchtrain_app", ["--help"], 0),
        ("cli.stitchtrain_app", ["--version"], 0),
        ("cli.stitchtrain_app", ["fit", "--help"], 0),
        ("cli.stitchtrain_app", ["tree", "--help"], 0),
        ("cli.stitchtrain_app", ["fit", "--stitch", "cubic"], 2),
        ("cli.stitchtrain_app", [*FIT, "--device", "gpu"], 2),
        ("cli.stitchtrain_app", [*FIT, "--memory-budget", "lots"], 2),
        ("cli.featcache_app", ["models"], 0),  # presets state their architecture
        ("cli.stitchtrain_app", ["positions", "dinov2-l", "siglip2-tiny"], 0),
    ],
)
def test_help_version_and_parse_errors_load_no_heavy_library(module, args, status):
    done, heavy = _run(module, *args)
    assert done.returncode == status, done.stdout + done.stderr
    assert heavy == []


# What --help and --version do without (benchmarks/cli_startup.py: each costs a sizeable share
# of ``import typer, rich``): rich's console and tables, typer's rich help (markdown, syntax),
# the progress display, and the libraries behind the commands.
NOT_FOR_HELP = (
    "rich.console",
    "rich.table",
    "rich.progress",
    "typer.rich_utils",
    "cli._progress",
    "dask",
    "numpy",
    "pandas",
    "zarr",
    "featcache.store",
    "featcache.encoders",
)


@pytest.mark.parametrize(
    "module, args",
    [
        ("cli.featcache_app", ["--help"]),
        ("cli.featcache_app", ["--version"]),
        ("cli.stitchtrain_app", ["--help"]),
        ("cli.stitchtrain_app", ["tree", "--help"]),
    ],
)
def test_help_and_version_stay_within_typer(module, args):
    code = _RUNNER.replace("heavy = {heavy!r}", f"heavy = {NOT_FOR_HELP!r}")
    code = code.format(argv=[module.rsplit(".", 1)[-1], *args], module=module)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1].removeprefix("HEAVY="))
    assert loaded == [], loaded


def test_version_prints_the_package_version():
    import featcache

    done, _ = _run("cli.featcache_app", "--version")
    assert done.stdout.splitlines()[0] == featcache.__version__


def test_store_commands_load_no_heavy_library(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    url = _make_store(tmp_path / "s.zarr")
    for args, status in [
        (["ls", str(empty)], 0),
        (["ls", str(tmp_path)], 0),
        (["info", url, "--json"], 0),
        (["verify", url], 0),
        (["verify", url, "--fingerprint", "other"], 1),
        (["rm", url], 0),
    ]:
        done, heavy = _run("cli.featcache_app", *args)
        assert done.returncode == status, (args, done.stdout + done.stderr)
        assert heavy == [], args
    assert not (tmp_path / "s.zarr").exists()
