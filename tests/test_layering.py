"""The layering contracts in pyproject.toml ([tool.importlinter]) hold, and they can fail.

``lint-imports`` runs in CI before the tests (bootstrap.sh test). These tests run it on the
repository as it is (every contract kept) and on copies with one arrow added that breaks one
rule each: an upward import, an import circle between two sibling modules, zarr outside the
store, timm outside the encoder adapters, a dataset reader importing another reader. A check
that kept its contracts with such an arrow present would prove nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory) -> Path:
    """A copy of the three packages and pyproject.toml (the contracts), outside the checkout."""
    root = tmp_path_factory.mktemp("layering")
    for package in ("featcache", "stitchtrain", "cli"):
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_contracts_are_kept(copy_root):
    result = _lint(copy_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


BREAKS = {
    "featcache imports cli (upward)": (
        "featcache/errors.py",
        "import cli._console",
        "cli -> stitchtrain -> featcache",
    ),
    "a circle between two sibling modules": (
        "featcache/errors.py",
        "import featcache.devices",
        "no import circles",
    ),
    "stitchtrain.train imports stitchtrain.evaluate": (
        "stitchtrain/model/losses.py",
        "import stitchtrain.evaluate",
        "stitchtrain by concern",
    ),
    "zarr outside the store": ("featcache/images.py", "import zarr", "only the store imports zarr"),
    "timm outside the encoder adapters": (
        "stitchtrain/model/stitches.py",
        "import timm",
        "only the encoder adapters import timm",
    ),
    "a dataset reader imports another reader": (
        "featcache/datasets/llava.py",
        "import featcache.datasets.wds",
        "dataset readers are independent of each other",
    ),
    "the dataset core imports a reader": (
        "featcache/datasets/core.py",
        "import featcache.datasets.fmow",
        "the dataset core imports no reader",
    ),
    "encoders import the store": (
        "featcache/encoders/presets.py",
        "import featcache.store",
        "encoders do not know the store",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_each_rule_catches_its_arrow(copy_root, tmp_path, case):
    module, line, contract = BREAKS[case]
    root = tmp_path / "repo"
    shutil.copytree(copy_root, root)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # the arrow under test\n")
    result = _lint(root)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken, result.stdout
