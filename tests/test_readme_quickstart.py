"""Issue 23's "Done when": the README's quick start works on a plain class folder.

The test reads the fenced blocks of README.md's "Quick start: your own photos" section and runs
every command through the CLIs, in a temp folder holding ``photos/<class>/`` of 42 images of
mixed modes and sizes (grey, CMYK, RGBA, palette, grey + alpha, odd sizes). It substitutes only
what this machine needs: each real preset by the tiny preset of its family (seeded random
weights: the hub is off here, and the quick start's presets take the hub's weights without an
option) and every epoch count by 1; paths stay as written (relative to the temp folder) and
globs are expanded as a shell would. So a README command that breaks (an option renamed, a
default that no longer fits, a config key refused) fails here.

The friction met on the way has its own tests below: a sweep config's store may be a glob
matching one store (as fit's shell globs are), and a store may name the weights file its
encoder was extracted with (per encoder, where ``[fit] target_weights`` is one file for all).
"""

from __future__ import annotations

import glob
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.featcache_app import app as featcache_app
from cli.stitchtrain_app import app as stitchtrain_app
from featcache.encoders import load_encoder
from featcache.errors import FeatcacheError
from stitchtrain.studies.sweep.grid import plan_sweep

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Quick start: your own photos"
APPS = {"featcache": featcache_app, "stitchtrain": stitchtrain_app}
# a real preset (dinov2-s, siglip2-b, clip-l, ...) -> the tiny preset of its family
PRESET = re.compile(r"\b(dinov2|dinov3|siglip2|clip)-[slb]\b")
CLASSES = ("cat", "dog", "eel")
# (mode, suffix, (width, height)) cycled over the images: every mode a photo folder may hold
KINDS = [
    ("RGB", ".jpg", (48, 36)),
    ("L", ".jpg", (31, 57)),
    ("CMYK", ".jpg", (64, 64)),
    ("RGBA", ".png", (90, 20)),
    ("P", ".png", (25, 25)),
    ("LA", ".png", (40, 70)),
    ("RGB", ".jpeg", (33, 47)),
]
runner = CliRunner()


def write_photos(root: Path, per_class: int = 14, seed: int = 0) -> Path:
    """``root/<class>/NN.<ext>``: ``per_class`` images per class of mixed modes and sizes."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode, suffix, (width, height) = KINDS[(i + 2 * c) % len(KINDS)]
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i:02d}{suffix}")
    return root


def quick_start() -> tuple[list[str], str]:
    """The section's commands (continuation lines joined, comments dropped) and its config."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", section, flags=re.M | re.S)
    bash = [body for lang, body in blocks if lang == "bash"]
    toml = [body for lang, body in blocks if lang == "toml"]
    assert len(bash) == 1 and len(toml) == 1, [lang for lang, _ in blocks]
    joined = bash[0].replace("\\\n", " ")
    commands = [line.split("#", 1)[0].strip() for line in joined.splitlines()]
    return [c for c in commands if c], toml[0]


def for_this_machine(text: str) -> str:
    """Tiny presets and one epoch: what this machine needs, nothing else."""
    text = PRESET.sub(lambda m: f"{m.group(1)}-tiny", text)
    text = re.sub(r"--epochs\s+\d+", "--epochs 1", text)
    return re.sub(r"^epochs\s*=\s*\d+", "epochs = 1", text, flags=re.M)


def run(command: str) -> str:
    """One README command through its CLI (in process), globs expanded as a shell would."""
    tool, *args = shlex.split(command)
    expanded = []
    for arg in args:
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        assert matches, f"{arg!r} matches nothing (in: {command})"
        expanded += matches
    result = runner.invoke(APPS[tool], expanded)
    assert result.exit_code == 0, f"{command}\n{result.output}"
    return result.output


def test_the_readme_quick_start_runs_from_a_class_folder_to_a_report(tmp_path, monkeypatch):
    commands, config = quick_start()
    tools = [c.split()[:2] for c in commands]
    for step in (["featcache", "extract"], ["stitchtrain", "positions"], ["stitchtrain", "fit"]):
        assert step in tools, f"the quick start has no {' '.join(step)}"
    assert tools[-2:] == [["stitchtrain", "sweep"], ["stitchtrain", "report"]], tools
    # the photos folder and the config file are the ones the commands name
    data = shlex.split(next(c for c in commands if "--data" in c))
    config_path = shlex.split(commands[-2])[2]
    report = shlex.split(commands[-1])
    monkeypatch.chdir(tmp_path)
    write_photos(Path(data[data.index("--data") + 1]))
    Path(config_path).write_text(for_this_machine(config))

    for command in commands:
        run(for_this_machine(command))

    page = Path(report[report.index("--out") + 1]) / "index.html"
    assert page.is_file()
    html = page.read_text()
    stores = config.split("[stores]", 1)[1].split("\n[", 1)[0]
    first, second = re.findall(r"^(\w[\w.-]*)\s*=", stores, re.M)  # the sweep's two models
    assert f"{first}→{second}" in html and f"{second}→{first}" in html


# -- friction met on the way: a sweep config's stores ---------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """``ROOT/stores/{train,test}/`` of two tiny encoders over a small mixed folder, dinov2's
    extracted with a weights file of its own (another seed: not the preset's random weights);
    ``ROOT/dinov2-tiny.safetensors`` is that file."""
    root = tmp_path_factory.mktemp("quickstart-stores")
    write_photos(root / "photos", per_class=5)
    other = load_encoder("dinov2-tiny", seed=1).module.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(root / "dinov2-tiny.safetensors"))
    for split in ("train", "test"):
        args = ["extract", "--model", "dinov2-tiny", "--model", "siglip2-tiny"]
        args += ["--weights", f"dinov2-tiny={root / 'dinov2-tiny.safetensors'}"]
        args += ["--data", str(root / "photos"), "--out", str(root / "stores"), "--layers", "2,4"]
        args += ["--test-fraction", "0.2", "--split", split]
        result = runner.invoke(featcache_app, args)
        assert result.exit_code == 0, result.output
    return root


def _config(**stores) -> dict:
    return {"stores": stores, "grid": {"positions": [2], "objectives": ["ffm"]}}


def test_a_sweep_store_may_be_a_glob_matching_one_store(stores):
    plan = plan_sweep(
        _config(dinov2="stores/train/dinov2-tiny-*.zarr", siglip2="stores/train/siglip2-*.zarr"),
        base=stores,
    )
    (dinov2,) = glob.glob(str(stores / "stores/train/dinov2-tiny-*.zarr"))
    (siglip2,) = glob.glob(str(stores / "stores/train/siglip2-tiny-*.zarr"))
    assert plan.config["stores"]["dinov2"]["train"] == dinov2
    stitch = next(p for p in plan.points if p.id.startswith("dinov2--siglip2"))
    assert (stitch.config["source"], stitch.config["target"]) == (dinov2, siglip2)


def test_a_store_glob_matching_none_or_several_stores_is_refused_naming_them(stores, tmp_path):
    with pytest.raises(FeatcacheError) as none:
        plan_sweep(_config(dinov2="stores/train/dinov3-*.zarr"), base=stores)
    message = str(none.value)
    assert "\n" not in message
    assert "[stores] dinov2" in message and "stores/train/dinov3-*.zarr" in message
    assert "matches no store" in message and "featcache ls" in message

    (original,) = (stores / "stores/train").glob("dinov2-tiny-*.zarr")
    for copy in ("a", "b"):
        shutil.copytree(original, tmp_path / "train" / f"dinov2-tiny-{copy}.zarr")
    with pytest.raises(FeatcacheError) as several:
        plan_sweep(_config(dinov2="train/dinov2-tiny-*.zarr"), base=tmp_path)
    message = str(several.value)
    assert "\n" not in message and "Expected [stores] dinov2 to match one store" in message
    assert "dinov2-tiny-a.zarr" in message and "dinov2-tiny-b.zarr" in message


def test_each_sweep_store_may_name_its_weights_file(stores, tmp_path):
    (stores / "sweep.toml").write_text(
        """
[stores]
dinov2 = { train = "stores/train/dinov2-tiny-*.zarr", weights = "dinov2-tiny.safetensors" }
siglip2 = "stores/train/siglip2-tiny-*.zarr"

[grid]
positions = [2]
objectives = ["ffm"]

[fit]
lr = 5e-3
epochs = 1
"""
    )
    result = runner.invoke(
        stitchtrain_app, ["sweep", str(stores / "sweep.toml"), "--out", str(tmp_path / "sweep")]
    )
    # siglip2 -> dinov2 and dinov2 -> dinov2 run dinov2's blocks: with its file, not the preset
    assert result.exit_code == 0, result.output
    assert "6 points: 6 ok, 0 failed" in result.output
    plan = plan_sweep(
        _config(
            dinov2={"train": "stores/train/dinov2-tiny-*.zarr", "weights": "w.st"},
            siglip2="stores/train/siglip2-tiny-*.zarr",
        ),
        base=stores,
    )
    by_id = {p.id: p.config for p in plan.points}
    weights = str(stores / "w.st")
    assert by_id["siglip2--dinov2--ffm--mlp--n2--s0"]["target_weights"] == weights
    assert by_id["dinov2--siglip2--ffm--mlp--n2--s0"]["source_weights"] == weights
    assert "target_weights" not in by_id["dinov2--siglip2--ffm--mlp--n2--s0"]


def test_store_weights_and_fit_weights_together_are_refused(stores):
    config = _config(
        dinov2={"train": "stores/train/dinov2-tiny-*.zarr", "weights": "w.st"},
        siglip2="stores/train/siglip2-tiny-*.zarr",
    )
    config["fit"] = {"target_weights": "other.safetensors"}
    with pytest.raises(FeatcacheError) as refused:
        plan_sweep(config, base=stores)
    message = str(refused.value)
    assert "\n" not in message and "[fit] target_weights" in message and "[stores]" in message
