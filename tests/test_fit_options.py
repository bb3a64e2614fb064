"""The protocol's open choices as fit options (README "Choices the paper leaves open").

Every option's default is today's behaviour (AdamW's weight decay 0.01, a constant learning
rate, a fresh TLT head); each option changes what it names and nothing else; the cosine schedule
is the documented formula per optimiser step and resumes bitwise; ``--head probe`` starts TLT
from the target's fitted probe; a mask value 255 is "ignore", never a class.
"""

from __future__ import annotations

import json
import math
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import extract_demo_stores, history_without_timing, pair_fit_config
from PIL import Image
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from cli.stitchtrain_app import app
from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.model.losses import IGNORE_INDEX, segmentation_targets
from stitchtrain.pipeline.fit import StitchRecipe, fit
from stitchtrain.scoring.probe import fit_linear_decoder, fit_linear_probe
from stitchtrain.train.config import FitConfig, scheduled_lr
from stitchtrain.train.heads import mask_ignore_value, mask_num_classes

runner = CliRunner()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{(model, split): url}: 3 classes x 8 images (18 train rows: 16 train + 2 validation,
    so 2 optimiser steps an epoch at batch size 8; 6 test rows), layer 2, with masks."""
    root = tmp_path_factory.mktemp("options")
    return extract_demo_stores(
        root / "data",
        root / "stores",
        models=["dinov2-tiny", "clip-tiny"],
        layers=[2],
        shard_size=4,
    )


_config = pair_fit_config


def _outcome(out: Path) -> dict:
    history = history_without_timing(out)
    head = out / "head.safetensors"
    return {
        "stitch": load_file(str(out / "stitch.safetensors")),
        "head": load_file(str(head)) if head.is_file() else {},
        "history": history,
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def _same(got: dict, want: dict, label: str = "") -> None:
    for name in ("stitch", "head"):
        assert got[name].keys() == want[name].keys(), label
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (label, name, key)
    assert got["history"] == want["history"], label
    assert got["metrics"] == want["metrics"], label


class _Steps:
    """Records, before every optimiser step, each optimiser's lr / weight decay (and, on its
    first step, the trainable parameters: the TLT head is the last two)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, float]] = []
        self.first: list[list[torch.Tensor]] = []  # per optimiser, in order of first step
        self.index: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # (ids recur)

    def __enter__(self):
        def hook(optimizer, args, kwargs):
            group = optimizer.param_groups[0]
            if optimizer not in self.index:
                self.index[optimizer] = len(self.first)
                self.first.append([p.detach().clone() for p in group["params"]])
            self.steps.append((self.index[optimizer], group["lr"], group["weight_decay"]))

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def per_optimizer(self) -> list[list[tuple[float, float]]]:
        runs: dict[int, list] = {}
        for key, lr, decay in self.steps:
            runs.setdefault(key, []).append((lr, decay))
        return list(runs.values())


# -- defaults: today's recipe ---------------------------------------------------------------------
def test_defaults_are_todays_recipe_and_explicit_defaults_change_nothing(stores, tmp_path):
    with _Steps() as recorded:
        fit(_config(stores, tmp_path / "default", epochs=2))
    explicit = _config(
        stores,
        tmp_path / "explicit",
        epochs=2,
        head="fresh",
        weight_decay=0.01,
        lr_schedule="constant",
        warmup_epochs=0,
        seg_decoder="grid",
    )
    fit(explicit)
    _same(_outcome(tmp_path / "explicit"), _outcome(tmp_path / "default"))
    # today: torch.optim.AdamW(params, lr=lr), its default weight decay, the same lr every step
    runs = recorded.per_optimizer()
    assert len(runs) == 4  # 2 stages x 2 lrs (training only: the run ends on TLT, no probe)
    for run, lr in zip(runs, [1e-3, 5e-3, 1e-3, 5e-3], strict=True):
        assert {step for step in run} == {(lr, 0.01)}
    assert torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["weight_decay"] == 0.01
    protocol = _outcome(tmp_path / "default")["metrics"]["protocol"]
    assert protocol["head"] == "fresh" and protocol["weight_decay"] == 0.01
    assert protocol["lr_schedule"] == "constant" and protocol["warmup_epochs"] == 0
    assert protocol["validation"] == {
        "rows": "val_fraction of the train rows",
        "val_fraction": 0.1,
        "seed": 0,
    }


def test_weight_decay_zero_changes_the_weights(stores, tmp_path):
    with _Steps() as recorded:
        fit(_config(stores, tmp_path / "wd0", objective="lfm", lrs=(5e-3,), weight_decay=0.0))
    fit(_config(stores, tmp_path / "wd", objective="lfm", lrs=(5e-3,)))
    assert {decay for _, _, decay in recorded.steps} == {0.0}
    got, want = _outcome(tmp_path / "wd0"), _outcome(tmp_path / "wd")
    assert not all(torch.equal(got["stitch"][k], want["stitch"][k]) for k in want["stitch"])
    assert got["metrics"]["protocol"]["weight_decay"] == 0.0


# -- cosine schedule ------------------------------------------------------------------------------
def _cosine(base: float, step: int, steps_per_epoch: int, epochs: int, warmup: int) -> float:
    """The README's formula, written out independently of stitchtrain.train.fit."""
    warm, total = warmup * steps_per_epoch, epochs * steps_per_epoch
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


def test_cosine_schedule_sets_the_formula_lr_every_step(stores, tmp_path):
    config = _config(
        stores,
        tmp_path / "cos",
        objective="lfm",
        epochs=4,
        patience=4,
        lr_schedule="cosine",
        warmup_epochs=1,
    )
    with _Steps() as recorded:
        fit(config)
    runs = recorded.per_optimizer()[:2]  # the stitch's two lrs (then the evaluation probe's)
    assert all(len(run) == 8 for run in runs)  # 4 epochs x 2 steps
    for run, base in zip(runs, config.lrs, strict=True):
        want = [_cosine(base, s, 2, 4, 1) for s in range(8)]
        assert [lr for lr, _ in run] == pytest.approx(want, rel=1e-12, abs=0)
        assert run[0][0] == pytest.approx(base / 2) and run[1][0] == pytest.approx(base)
    for step in range(8):
        assert scheduled_lr(1.0, step, 2, 4, 1, "cosine") == pytest.approx(
            _cosine(1.0, step, 2, 4, 1)
        )
        assert scheduled_lr(1.0, step, 2, 4, 0, "constant") == 1.0
    assert _outcome(tmp_path / "cos")["metrics"]["protocol"]["lr_schedule"] == "cosine"


class _Snapshotting(StitchRecipe):
    """Copies the run dir after every checkpoint write (each one a kill point)."""

    def __init__(self, config: FitConfig, where: Path) -> None:
        super().__init__(config, checkpoint_every=0)  # a checkpoint after every epoch
        self.where, self.count = where, 0

    def _save_checkpoint(self, *args, **kwargs):
        super()._save_checkpoint(*args, **kwargs)
        self.count += 1
        shutil.copytree(self.out, self.where / f"k{self.count}")


def test_cosine_with_probe_head_resumes_exactly_after_every_checkpoint(stores, tmp_path):
    config = _config(
        stores,
        tmp_path / "run",
        objective="tlt",
        epochs=3,
        patience=3,
        lr_schedule="cosine",
        warmup_epochs=1,
        head="probe",
    )
    recipe = _Snapshotting(config, tmp_path)
    recipe.run()
    want = _outcome(tmp_path / "run")
    assert recipe.count == 8  # 2 lrs x (3 epoch checkpoints + 1 at the lr boundary)
    for k in range(1, recipe.count + 1):
        shutil.rmtree(tmp_path / "run")
        shutil.copytree(tmp_path / f"k{k}", tmp_path / "run")
        if k < recipe.count:
            state = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["state"]
            assert state["step"] == 2 * state["epoch"]  # the schedule's position is checkpointed
        fit(config)
        _same(_outcome(tmp_path / "run"), want, f"k={k}")


# -- the TLT head initialised from the target's probe -----------------------------------------
def test_probe_head_starts_tlt_from_the_targets_fitted_probe(stores, tmp_path):
    config = _config(stores, tmp_path / "run", objective="ffm+tlt", head="probe")
    recipe = StitchRecipe(config)
    with _Steps() as recorded:
        metrics = recipe.run()
    target = FeatureStore.open(config.target)
    pooled = torch.from_numpy(target.read("pooled"))
    labels = torch.from_numpy(target.read("labels")).long()
    train, val = recipe.train_rows, recipe.val_rows
    probe = fit_linear_probe(
        pooled[train],
        labels[train],
        pooled[val],
        labels[val],
        num_classes=3,
        lrs=config.lrs,
        epochs=config.epochs,
        patience=config.patience,
        seed=config.seed,
    )
    # FFM's two lrs, the probe's two (fitted when TLT starts), then TLT's two
    tlt_runs = recorded.first[-2:]
    assert len(recorded.first) == 6
    for params in tlt_runs:  # every learning rate of the grid starts from the probe
        assert torch.equal(params[-2], probe.head.weight.detach())
        assert torch.equal(params[-1], probe.head.bias.detach())
    assert metrics["protocol"]["head"] == "probe"
    assert metrics["stages"]["tlt"]["head_init"]["lr"] == probe.lr


def test_probe_head_for_segmentation_is_the_targets_linear_decoder(stores, tmp_path):
    config = _config(stores, tmp_path / "run", objective="tlt", task="seg", head="probe", epochs=1)
    recipe = StitchRecipe(config)
    head = recipe._probe_head()
    target = FeatureStore.open(config.target)
    final = torch.from_numpy(target.read("final"))
    masks = torch.from_numpy(target.read("masks")).long()
    train, val = recipe.train_rows, recipe.val_rows
    decoder = fit_linear_decoder(
        final[train],
        masks[train],
        final[val],
        masks[val],
        make_head=recipe._new_head,
        num_classes=recipe.num_classes,
        lrs=config.lrs,
        epochs=1,
        patience=config.patience,
        seed=config.seed,
    )
    for key, value in decoder.head.state_dict().items():
        assert torch.equal(head["state"][key], value), key


def test_probe_head_needs_a_tlt_stage():
    with pytest.raises(FeatcacheError, match="--head probe") as caught:
        FitConfig(source="s", target="t", position=1, out="o", objective="ffm", head="probe")
    assert "\n" not in str(caught.value)


# -- scoring LFM / FFM segmentation stitches ------------------------------------------------------
def test_seg_decoder_grid_and_fixed_are_recorded(stores, tmp_path):
    runs = {}
    for kind in ("grid", "fixed"):
        with _Steps() as recorded:
            config = _config(stores, tmp_path / kind, objective="ffm", task="seg", seg_decoder=kind)
            runs[kind] = fit(config), recorded.per_optimizer()[2:]  # after FFM's two lrs
    (grid, grid_decoders), (fixed, fixed_decoders) = runs["grid"], runs["fixed"]
    # grid: one decoder per lr of the grid; fixed: one, at the first lr, min(epochs, 20) epochs
    assert [run[0][0] for run in grid_decoders] == [1e-3, 5e-3]
    assert fixed_decoders == [[(1e-3, 0.01)] * 3]  # 3 epochs x 1 batch of 16 rows
    assert grid["evaluation"] == fixed["evaluation"] == "linear_decoder"
    assert grid["protocol"]["seg_decoder"] == "grid" and grid["decoder_lr"] in (1e-3, 5e-3)
    assert fixed["protocol"]["seg_decoder"] == "fixed" and fixed["decoder_lr"] == 1e-3
    for metrics in (grid, fixed):
        assert 0.0 <= metrics["test_miou"] <= 1.0 and metrics["miou_definition"] == "mmseg"


# -- segmentation classes: declared, else counted, never the ignore value --------------------------
def test_mask_classes_are_declared_or_counted_never_the_ignore_value():
    masks = np.array([[0, 1, 3], [255, 255, IGNORE_INDEX]], np.int16)
    legacy = {"classes": []}  # a store from before mask_labels: raw values, 255 = ignore
    assert mask_ignore_value(legacy) == 255
    assert mask_num_classes(legacy, masks) == 4  # not 256
    assert mask_num_classes(legacy, np.full((2, 2), 255, np.int16)) == 1
    mapped = {"classes": [], "mask_labels": {"ignore_value": 255, "num_classes": None}}
    assert mask_ignore_value(mapped) is None  # extraction mapped 255 to -1: any 255 is a label
    assert mask_num_classes(mapped, masks) == 256
    declared = {"classes": [], "mask_labels": {"ignore_value": 255, "num_classes": 150}}
    assert mask_num_classes(declared, masks[:1]) == 150  # the declared classes, not max + 1
    # the dataset's classes are the images' labels (demo: 3 shapes; masks 0 = background .. 3)
    assert mask_num_classes({"classes": ["a", "b", "c"], "mask_labels": {}}, masks[:1]) == 4
    targets = segmentation_targets(torch.from_numpy(masks), 4, ignore_value=255)
    assert targets.tolist() == [[0, 1, 3], [IGNORE_INDEX] * 3]
    with pytest.raises(FeatcacheError, match="mask value 255") as caught:
        segmentation_targets(torch.from_numpy(masks), 4)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def stores_255(tmp_path_factory):
    """Like ``stores`` (4 images a class), but every mask PNG has a 255 ("no label") band of 8
    rows; extraction stores it as -1 (``featcache.datasets.MaskLabels``)."""
    from featcache.demo_data import make_demo_dataset
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    root = tmp_path_factory.mktemp("ignore255")
    manifest = make_demo_dataset(root / "data", num_classes=3, per_class=4)
    for path in (root / "data" / "masks").rglob("*.png"):
        mask = np.array(Image.open(path))
        mask[:8] = 255
        Image.fromarray(mask).save(path)
    urls = {}
    for split in ("train", "test"):
        plan = plan_extraction(
            ExtractConfig(
                models=["dinov2-tiny", "clip-tiny"],
                data=str(manifest),
                out=str(root / "stores"),
                layers=[2],
                split=split,
                shard_size=4,
            )
        )
        run_extraction(plan)
        urls.update(
            {(m, split): u for m, u in zip(["dinov2-tiny", "clip-tiny"], plan.urls, strict=True)}
        )
    masks = FeatureStore.open(urls["clip-tiny", "train"]).read("masks")
    assert (masks[:, :8] == IGNORE_INDEX).all() and masks.max() == 3
    return urls


def test_a_255_in_the_masks_is_ignored_not_a_256th_class(stores_255, tmp_path):
    config = _config(
        stores_255, tmp_path / "run", objective="tlt", task="seg", epochs=1, lrs=(5e-3,)
    )
    recipe = StitchRecipe(config)
    assert recipe.num_classes == 4  # background + 3 shapes
    metrics = recipe.run()
    assert 0.0 <= metrics["test_miou"] <= 1.0


# -- options on the command line ------------------------------------------------------------------
def _fit_args(stores, out, *extra):
    return [
        "fit",
        "--source",
        stores["dinov2-tiny", "train"],
        "--target",
        stores["clip-tiny", "train"],
        "--position",
        "2",
        "--out",
        str(out),
        "--objective",
        "tlt",
        "--lr",
        "5e-3",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--json",
        *extra,
    ]


def test_cli_fit_takes_the_new_options(stores, tmp_path):
    extra = [
        "--head",
        "probe",
        "--weight-decay",
        "0",
        "--lr-schedule",
        "cosine",
        "--warmup-epochs",
        "1",
        "--seg-decoder",
        "fixed",
    ]
    result = runner.invoke(app, _fit_args(stores, tmp_path / "run", *extra))
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["head"] == "probe" and saved["weight_decay"] == 0.0
    assert saved["lr_schedule"] == "cosine" and saved["warmup_epochs"] == 1
    assert saved["seg_decoder"] == "fixed"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--head", "target"], "'target' is not one of"),
        (["--lr-schedule", "step"], "'step' is not one of"),
        (["--seg-decoder", "best"], "'best' is not one of"),
        (["--warmup-epochs", "-1"], "Expected an integer >= 0. Got -1"),
        (["--weight-decay", "-0.1"], "Expected --weight-decay >= 0"),
        (["--warmup-epochs", "1"], "--warmup-epochs needs --lr-schedule cosine"),
        (["--lr-schedule", "cosine", "--warmup-epochs", "2"], "--warmup-epochs < --epochs"),
    ],
)
def test_cli_refuses_bad_option_values_in_one_line(stores, tmp_path, extra, message):
    result = runner.invoke(app, _fit_args(stores, tmp_path / "bad", *extra))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    if "not one of" not in message and "integer" not in message:  # ours, not click's box
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "bad").exists()


def test_a_run_dir_from_before_the_options_counts_them_as_defaults(stores, tmp_path):
    config = _config(stores, tmp_path / "run", objective="ffm", epochs=1, lrs=(5e-3,))
    metrics = fit(config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for name in ("head", "weight_decay", "lr_schedule", "warmup_epochs", "seg_decoder"):
        del saved[name]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert fit(config) == metrics


def test_cli_choices_are_the_library_choices():
    from typing import get_args

    import cli.stitchtrain_app as cli
    from stitchtrain.scoring.metrics import MIOU_DEFINITIONS
    from stitchtrain.train.config import HEADS, LR_SCHEDULES, SEG_DECODERS

    assert get_args(cli.Head) == HEADS and get_args(cli.LrSchedule) == LR_SCHEDULES
    assert get_args(cli.SegDecoder) == SEG_DECODERS and get_args(cli.Miou) == MIOU_DEFINITIONS
    help_text = runner.invoke(app, ["fit", "--help"]).output
    for option in ("--head", "--weight-decay", "--lr-schedule", "--warmup-epochs", "--seg-decoder"):
        assert option in help_text
