"""``stitchtrain fit``: one readable training recipe for a stitch layer (paper sections 3-5).

    setup     open and check the stores (``integrity.usable_rows``: stores with unmarked shards
              are refused unless ``allow_incomplete``), pair them, split train rows into train /
              validation, find and check the test stores, load the frozen target encoder (FFM,
              TLT, evaluation) and check its fingerprint
    stages    the objective's stages in order ("ffm+tlt" = FFM, then TLT from the FFM stitch);
              each stage trains one stitch per learning rate in the grid with early stopping on
              the validation loss and keeps the best by validation metric
    evaluate  test-split accuracy / mIoU and the Figure 2 feature distances (``evaluate.py``)
    save      config.json, stitch.safetensors, head.safetensors, history.csv, metrics.json,
              and per LFM / FFM stage stitch-<stage>.safetensors + stage-<stage>.json

Shared stages: an LFM or FFM stage is the same computation in every run whose config agrees on
what decides it (``StitchRecipe.stage_key``: the config without the later stages, the test
stores and the scoring options; the stages up to it; the stores' ids, the train / validation
rows, the device and the torch version), e.g. the FFM stage of ``ffm`` and of ``ffm+tlt`` at
one position. ``stage-<stage>.json`` records that key, the stage's result and history rows and
its stitch file's SHA-256; given ``reuse`` run dirs, a stage whose key and hash one of them
holds is taken from it (``metrics.json``: ``stages.<stage>.reused_from``) instead of trained.

Per stage, one optimisation step on a batch of B rows:
    lfm   loss = mse(S(src_n), tgt_n)                                 no encoder runs
    ffm   loss = mse(T(S(src_n)).final, tgt_final)   (pooled-only: .pooled vs tgt_pooled)
    tlt   loss = CE(head(T(S(src_n)).pooled), y)     (seg: per-patch head on final, upsampled)
where T is the frozen target tail (blocks n+1..N, final norm, pooling): forward and backward to
the stitch, no weight gradients in the tail. The step is AdamW's (``weight_decay``, default
0.01) at ``scheduled_lr`` (``lr_schedule``: constant, or per-step linear warm-up and cosine);
the TLT head starts fresh or, ``head="probe"``, from the target's own fitted probe / decoder.
The LoRA stitch reads src_{n-1} instead. Features
are checked finite as they are read, and a non-finite loss stops the run before its step
(``NonFiniteLossError``, naming stage, learning rate, epoch and the batch's store rows).

Checkpoints: after an epoch once ``checkpoint_every`` seconds (default ``CHECKPOINT_EVERY_S``;
0: every epoch) have passed since the last one, always when a learning rate finishes, and after
a SIGTERM at the end of the epoch in progress (then the fit stops: ``FitStopped``, exit status
143), the training state is written to the run dir as two files:
    checkpoint-<sha256[:16]>.safetensors   every tensor: the stitch, head and AdamW state of the
                                           learning rate in progress (after an epoch only), the
                                           best snapshots (current: this lr; overall: the
                                           finished lrs), the torch RNG state(s)
    checkpoint.json                        the rest: stage index, early-stopping and schedule
                                           state (optimiser steps taken at the lr), finished
                                           learning rates, stage results, history, the non-tensor
                                           snapshot fields, and the tensors file's name and hash
Each file is written to a temp file and renamed into place, tensors first: a kill between the
two leaves the previous checkpoint.json naming the previous tensors file, which is still there
(older tensors files are deleted only after the new JSON is in place); a tensors file whose
SHA-256 is not the one the JSON names is refused. The checkpoint files are removed once
metrics.json is written.

Resume guarantee: the same command on the same run dir continues from the last checkpoint
(replaying the epochs run since, at most ``checkpoint_every`` seconds of work) and ends with
the run an uninterrupted one writes, bitwise (stitch.safetensors, head.safetensors,
history.csv apart from its timing columns, metrics.json), wherever it was killed: inside a
learning rate, at a learning-rate or stage boundary, or during evaluation. Every random choice
is seeded from (seed, stage, learning rate, epoch) or restored from the checkpoint. A run dir
whose metrics.json exists is finished: ``fit`` returns those metrics at once, without opening
the stores, loading an encoder or training. A run dir made with a different config is refused.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save, save_file
from torch import nn

from featcache.encoders import Encoder, TokenLayout, load_encoder
from featcache.errors import FeatcacheError
from featcache.extract import resolve_device
from featcache.store import FeatureStore, write_atomic
from stitchtrain.data.integrity import format_rows, usable_rows
from stitchtrain.data.loader import FeatureLoader, Field, parse_size, split_rows
from stitchtrain.data.pairing import check_pair, source_array
from stitchtrain.model.losses import (
    IGNORE_INDEX,
    IGNORE_VALUE,
    classification_loss,
    feature_matching_loss,
    segmentation_logits,
    segmentation_loss,
    segmentation_targets,
)
from stitchtrain.model.stitches import Stitch, build_stitch
from stitchtrain.scoring.metrics import MIOU_DEFINITIONS, ConfusionMatrix
from stitchtrain.scoring.segscore import SCORE_RESOLUTIONS

__all__ = [
    "FitConfig",
    "StitchRecipe",
    "NonFiniteLossError",
    "FitStopped",
    "fit",
    "load_run_encoder",
    "check_run_dir",
    "OBJECTIVES",
    "HEADS",
    "LR_SCHEDULES",
    "SEG_DECODERS",
    "scheduled_lr",
    "mask_num_classes",
    "mask_ignore_value",
]

_log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.json"
# An epoch checkpoint costs 15-20 ms (a few MB hashed, written, fsynced): on a GPU, where an
# epoch of a small stitch can take less, one per epoch would be most of the fit.
CHECKPOINT_EVERY_S = 60.0


class NonFiniteLossError(FeatcacheError, FloatingPointError):
    """A NaN or infinite training or validation loss."""


class FitStopped(FeatcacheError):
    """A SIGTERM stopped the fit at an epoch's end, after writing a checkpoint there."""

    exit_code = 128 + signal.SIGTERM  # 143: what a process ended by SIGTERM reports


OBJECTIVES = ("lfm", "ffm", "tlt", "ffm+tlt", "lfm+tlt")
STITCHES = ("linear", "mlp", "lora")
INITS = ("random", "lstsq", "identity")
HEADS = ("fresh", "probe")  # the TLT head: fresh (today) or the target's fitted probe / decoder
LR_SCHEDULES = ("constant", "cosine")
SEG_DECODERS = ("grid", "fixed")  # scoring LFM / FFM seg stitches: A.2.2 protocol, or 20 epochs


@dataclass
class FitConfig:
    """Everything that defines a run; written to config.json and compared on resume."""

    source: str
    target: str
    position: int
    out: str
    stitch: str = "mlp"
    objective: str = "ffm+tlt"
    task: str = "cls"
    lrs: tuple[float, ...] = (1e-3, 5e-3, 1e-2)
    epochs: int = 100
    patience: int = 5
    batch_size: int | None = None  # None: 256 for LFM, 128 otherwise (A.2.2)
    init: str = "random"
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    memory_budget: str | None = None
    pooled_only: bool = False
    source_test: str | None = None
    target_test: str | None = None
    source_weights: str | None = None
    target_weights: str | None = None
    random_init: bool = False
    mlp_hidden: int | None = None
    lora_rank: int = 8
    allow_incomplete: bool = False  # use the marked shards of stores with unmarked ones
    allow_geometry_mismatch: bool = False  # pair stores whose tokens see different pixels
    # the protocol's open choices (README, Stitching: "Protocol choices"); defaults: the recipe
    # as it was before they were options (seg_decoder excepted: "fixed" was the old scoring)
    head: str = "fresh"  # TLT head: "fresh" (random, trained jointly) or "probe" (initialised)
    weight_decay: float = 0.01  # AdamW's (torch.optim.AdamW's default)
    lr_schedule: str = "constant"  # or "cosine": per step, linear warm-up then cosine to 0
    warmup_epochs: int = 0  # cosine only: epochs of linear warm-up
    seg_decoder: str = "grid"  # LFM / FFM seg scoring: "grid" (A.2.2 protocol) or "fixed"
    miou: str = "mmseg"  # mIoU definition (stitchtrain.scoring.metrics.MIOU_DEFINITIONS)
    score_resolution: str = "original"  # seg test score: "original" masks (A.2.5) or "input"

    def __post_init__(self) -> None:
        self.lrs = tuple(float(lr) for lr in self.lrs)
        self.weight_decay = float(self.weight_decay)
        checks = [
            (self.stitch in STITCHES, f"--stitch in {STITCHES}", self.stitch),
            (self.objective in OBJECTIVES, f"--objective in {OBJECTIVES}", self.objective),
            (self.task in ("cls", "seg"), "--task cls or seg", self.task),
            (self.init in INITS, f"--init in {INITS}", self.init),
            (self.lrs and all(lr > 0 for lr in self.lrs), "positive --lr values", self.lrs),
            (self.epochs >= 1 and self.patience >= 1, "--epochs, --patience >= 1", self.epochs),
            (0 < self.val_fraction < 1, "0 < --val-fraction < 1", self.val_fraction),
            (self.head in HEADS, f"--head in {HEADS}", self.head),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"--lr-schedule in {LR_SCHEDULES}",
                self.lr_schedule,
            ),
            (
                self.seg_decoder in SEG_DECODERS,
                f"--seg-decoder in {SEG_DECODERS}",
                self.seg_decoder,
            ),
            (self.miou in MIOU_DEFINITIONS, f"--miou in {MIOU_DEFINITIONS}", self.miou),
            (
                self.score_resolution in SCORE_RESOLUTIONS,
                f"--score-resolution in {SCORE_RESOLUTIONS}",
                self.score_resolution,
            ),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                "--weight-decay >= 0",
                self.weight_decay,
            ),
            (self.warmup_epochs >= 0, "--warmup-epochs >= 0", self.warmup_epochs),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise FeatcacheError(f"Expected {expected}. Got {got!r} instead.")
        if self.memory_budget is not None:
            try:
                parse_size(self.memory_budget)
            except ValueError:
                raise FeatcacheError(
                    "Expected --memory-budget as a size such as 512MB, 8GB, 2GiB or a number of "
                    f"bytes. Got {self.memory_budget!r} instead."
                ) from None
        if self.init == "lstsq" and self.stitch != "linear":
            raise FeatcacheError(f"--init lstsq fits a linear stitch. Got --stitch {self.stitch}.")
        if self.head == "probe" and "tlt" not in self.objective.split("+"):
            raise FeatcacheError(
                f"--head probe initialises the TLT head. Got --objective {self.objective}, "
                "which has no TLT stage."
            )
        if self.warmup_epochs and self.lr_schedule != "cosine":
            raise FeatcacheError(
                f"--warmup-epochs needs --lr-schedule cosine. Got --warmup-epochs "
                f"{self.warmup_epochs} with --lr-schedule {self.lr_schedule}."
            )
        if self.warmup_epochs >= self.epochs:
            raise FeatcacheError(
                f"Expected --warmup-epochs < --epochs (the cosine needs an epoch to decay). Got "
                f"--warmup-epochs {self.warmup_epochs} with --epochs {self.epochs}."
            )

    def grid_protocol(self) -> dict[str, Any]:
        """The A.2.2 protocol settings every head fitted for the run uses (probes, decoders,
        ``--head probe``): keyword arguments of ``probe.fit_linear_probe`` / ``_decoder``."""
        return dict(
            lrs=self.lrs,
            epochs=self.epochs,
            patience=self.patience,
            seed=self.seed,
            weight_decay=self.weight_decay,
        )

    def stage_batch_size(self, stage: str) -> int:
        return self.batch_size or (256 if stage == "lfm" else 128)


def scheduled_lr(
    base: float, step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, schedule: str
) -> float:
    """The learning rate of optimiser step ``step`` (0-based, counted from the start of one
    learning rate of the grid). "constant": ``base``. "cosine", with W = warmup_epochs x
    steps_per_epoch and T = epochs x steps_per_epoch (the maximum, not where early stopping
    ends): ``base * (step + 1) / W`` for step < W, then ``base * (1 + cos(pi (step - W) /
    (T - W))) / 2``, which would reach 0 at step T."""
    if schedule == "constant":
        return base
    warm, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def mask_ignore_value(dataset: dict) -> int | None:
    """The raw "no label" value left in a store's masks: None for a store that records its
    ``mask_labels`` (extraction mapped the ignore value to -1 already), ``IGNORE_VALUE`` (255)
    for a store from before that record, whose masks hold the label maps' raw values."""
    return None if "mask_labels" in dataset else IGNORE_VALUE


def mask_num_classes(dataset: dict, masks) -> int:
    """Segmentation classes of a store (attrs ``dataset``, its ``masks``): the declared
    ``dataset["mask_labels"]["num_classes"]`` (ADE20K: 150), else the largest mask value + 1
    (at least 1), never counting an ignored value (``IGNORE_INDEX``, and ``mask_ignore_value``:
    a 255 does not make 256 classes). ``dataset["classes"]`` are the images' labels, not the
    masks' (demo dataset: 3 shape labels, masks 0 = background .. 3), so they are not used."""
    declared = (dataset.get("mask_labels") or {}).get("num_classes")
    if declared:
        return int(declared)
    ignored = masks == IGNORE_INDEX
    if mask_ignore_value(dataset) is not None:
        ignored |= masks == mask_ignore_value(dataset)
    values = masks[~ignored]
    return int(values.max()) + 1 if values.size else 1


def load_run_encoder(
    store: FeatureStore, weights: str | None, random_init: bool, device
) -> Encoder:
    """Load the encoder a store was written with and refuse it if the fingerprint differs."""
    described = store.attrs["encoder"]
    spec = described["spec"]
    encoder = load_encoder(
        described["name"],
        weights=weights,
        random_init=random_init,
        device=device,
        **spec["overrides"],
    )
    if encoder.fingerprint != described["fingerprint"]:
        raise FeatcacheError(
            f"Encoder {described['name']} loaded with fingerprint {encoder.fingerprint}, but "
            f"{store.url} was extracted with fingerprint {described['fingerprint']}: different "
            "weights or preprocessing. Pass the weights the store was made with (--target-weights"
            " / --source-weights, or --random-init for a random-init store)."
        )
    return encoder


def _layout(store: FeatureStore) -> TokenLayout:
    layout = store.attrs["encoder"]["layout"]
    return TokenLayout(tuple(layout["prefix"]), tuple(layout["grid"]))


class _SegHead(nn.Module):
    """Linear decoder on patch tokens: ``(B, P + H*W, D)`` final tokens -> ``(B, H*W, C)``."""

    def __init__(self, width: int, num_classes: int, num_prefix: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.linear = nn.Linear(width, num_classes)

    def forward(self, final: torch.Tensor) -> torch.Tensor:
        return self.linear(final[:, self.num_prefix :])


@dataclass
class _StageState:
    """Progress through one stage's learning-rate grid (what a checkpoint records of it)."""

    lr_index: int = 0
    epoch: int = 0
    best_loss: float = math.inf  # of the lr in progress
    best_epoch: int = -1
    stale: int = 0  # epochs since the validation loss last improved
    step: int = 0  # optimiser steps taken at the lr in progress: the lr schedule's position
    finished: list[dict[str, Any]] = field(default_factory=list)  # per finished lr


class StitchRecipe:
    """Setup, the stage loop, evaluation and saving for one ``FitConfig``."""

    def __init__(
        self,
        config: FitConfig,
        checkpoint_every: float = CHECKPOINT_EVERY_S,
        reuse: Sequence[str | Path] = (),
    ) -> None:
        self.checkpoint_every = checkpoint_interval(checkpoint_every)  # not in the config
        self._stop_signal: str | None = None  # set by SIGTERM during run(): stop at epoch end
        self._last_checkpoint = time.monotonic()  # the epoch checkpoints' clock (run: reset)
        self.config = config
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.source = FeatureStore.open(config.source)
        self.target = FeatureStore.open(config.target)
        self.stages = config.objective.split("+")
        self.reuse = [Path(d) for d in reuse if Path(d).resolve() != self.out.resolve()]
        # before pairing: a stopped extraction's unwritten ids would read as another order
        rows, self.incomplete = usable_rows(self._reads(), config.allow_incomplete)
        check_pair(
            self.source,
            self.target,
            position=config.position,
            stitch=config.stitch,
            objective=config.objective,
            task=config.task,
            pooled_only=config.pooled_only,
            allow_geometry_mismatch=config.allow_geometry_mismatch,
        )
        self.train_rows, self.val_rows = split_rows(rows, config.val_fraction, config.seed)
        needs_target = any(s in ("ffm", "tlt") for s in self.stages)
        self.target_encoder = (
            load_run_encoder(self.target, config.target_weights, config.random_init, self.device)
            if needs_target
            else None
        )
        self.source_encoder = (
            load_run_encoder(self.source, config.source_weights, config.random_init, self.device)
            if config.stitch == "lora"
            else None
        )
        self.num_classes = self._num_classes()
        self.stitch = self._new_stitch()
        self.head = self._new_head()
        self.history: list[dict[str, Any]] = []
        self.stage_results: dict[str, Any] = {}
        self._loaders: dict[tuple[str, str], FeatureLoader] = {}
        self._probe_cache: dict[str, Any] | None = None  # the --head probe fit, made once

    def protocol(self) -> dict[str, Any]:
        """The run's choices among those the paper leaves open (README), for metrics.json."""
        config = self.config
        protocol = {
            "head": config.head,
            "weight_decay": config.weight_decay,
            "lr_schedule": config.lr_schedule,
            "warmup_epochs": config.warmup_epochs,
            "validation": {
                "rows": "val_fraction of the train rows",
                "val_fraction": config.val_fraction,
                "seed": config.seed,
            },
        }
        if config.task == "seg":
            protocol["miou_definition"] = config.miou
            protocol["score_resolution"] = config.score_resolution
            if self.stages[-1] != "tlt":
                protocol["seg_decoder"] = config.seg_decoder
        return protocol

    # -- construction ---------------------------------------------------------------------------
    def _num_classes(self) -> int:
        self.mask_ignore = None  # seg: mask_ignore_value of the target store
        if self.config.task == "cls":
            return max(len(self.target.attrs["dataset"]["classes"]), 1)
        self.mask_ignore = mask_ignore_value(self.target.attrs["dataset"])
        return mask_num_classes(self.target.attrs["dataset"], self.target.read("masks"))

    def _new_stitch(self) -> Stitch:
        config = self.config
        return build_stitch(
            config.stitch,
            source=_layout(self.source),
            target=_layout(self.target),
            source_width=self.source.attrs["encoder"]["width"],
            target_width=self.target.attrs["encoder"]["width"],
            mlp_hidden=config.mlp_hidden,
            source_encoder=self.source_encoder,
            position=config.position,
            lora_rank=config.lora_rank,
        ).to(self.device)

    def _new_head(self) -> nn.Module:
        encoder = self.target.attrs["encoder"]
        if self.config.task == "cls":
            return nn.Linear(encoder["pooled_width"], self.num_classes).to(self.device)
        return _SegHead(encoder["width"], self.num_classes, len(encoder["layout"]["prefix"])).to(
            self.device
        )

    def _probe_head(self) -> dict[str, Any]:
        """``--head probe``: the TLT head every learning rate starts from, fitted once (cached)
        on the target store's own outputs over the run's train / validation rows with the
        A.2.2 protocol (``probe.fit_linear_probe`` on pooled features for cls,
        ``probe.fit_linear_decoder`` on final tokens for seg), the run's lr grid, epochs,
        patience, seed and weight decay. Fitted under a forked RNG: the training's random
        stream is the one ``--head fresh`` sees. {"state", "lr", "val_metric", "epochs"}."""
        if self._probe_cache is not None:
            return self._probe_cache
        from stitchtrain.data.integrity import require_finite
        from stitchtrain.scoring.probe import fit_linear_decoder, fit_linear_probe

        config, target = self.config, self.target
        name, labels = ("pooled", "labels") if config.task == "cls" else ("final", "masks")
        split = {}
        for key, rows in (("train", self.train_rows), ("val", self.val_rows)):
            values = target.read(name, rows)
            require_finite(target, name, values, rows)
            split[key] = (
                torch.from_numpy(values).to(self.device),
                torch.from_numpy(target.read(labels, rows)).long().to(self.device),
            )
        protocol = config.grid_protocol()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if config.task == "cls":
                result = fit_linear_probe(
                    *split["train"], *split["val"], num_classes=self.num_classes, **protocol
                )
                metric = result.val_accuracy
            else:
                result = fit_linear_decoder(
                    *split["train"],
                    *split["val"],
                    make_head=self._new_head,
                    num_classes=self.num_classes,
                    miou=config.miou,
                    ignore_value=self.mask_ignore,
                    **protocol,
                )
                metric = result.val_miou
        self._probe_cache = {
            "state": _snapshot(result.head),
            "lr": result.lr,
            "val_metric": metric,
            "epochs": result.epochs,
        }
        return self._probe_cache

    def _seed(self, stage: str, lr_index: int) -> int:
        return self.config.seed * 1000 + self.stages.index(stage) * 10 + lr_index

    def _reads(self) -> list[tuple[FeatureStore, list[str]]]:
        """Each training store with the arrays the stages (and --init lstsq) read from it."""
        position = self.config.position
        source = [source_array(self.config.stitch, position)]
        target = [f.array for stage in self.stages for f in self._fields(stage)[1:]]
        if self.config.init == "lstsq":
            target.append(f"layers/{position}")
        if self.config.head == "probe":  # the head's probe / decoder reads the target's own
            target.append("pooled" if self.config.task == "cls" else "final")
            target.append("labels" if self.config.task == "cls" else "masks")
        return [(self.source, source), (self.target, list(dict.fromkeys(target)))]

    def _initial_state(self, stage_index: int) -> dict[str, torch.Tensor]:
        """The stitch a stage starts from: fresh (first stage) or the previous stage's best."""
        if stage_index > 0:
            return load_file(str(self.out / f"stitch-{self.stages[stage_index - 1]}.safetensors"))
        torch.manual_seed(self._seed(self.stages[0], 0))
        stitch = self._new_stitch()
        if self.config.init == "identity":
            stitch.init_identity()
        elif self.config.init == "lstsq":
            stitch.init_lstsq_batches(self._lstsq_batches())
        return {k: v.detach().clone() for k, v in stitch.state_dict().items()}

    def _lstsq_batches(self):
        fields = [
            Field("source", self.source, source_array(self.config.stitch, self.config.position)),
            Field("target", self.target, f"layers/{self.config.position}"),
        ]
        if f"layers/{self.config.position}" not in self.target.group:
            raise FeatcacheError(
                f"--init lstsq needs target layers/{self.config.position} in {self.target.url}."
            )
        loader = self._loader(fields, self.train_rows, 256, shuffle=False)
        for batch in loader.epoch(0):
            yield batch["source"], batch["target"]

    # -- data -----------------------------------------------------------------------------------
    def _loader(
        self, fields, rows, batch_size, *, shuffle: bool, seed: int = 0, return_rows=False
    ) -> FeatureLoader:
        budget = parse_size(self.config.memory_budget) if self.config.memory_budget else None
        return FeatureLoader(
            fields,
            rows,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            device=self.device,
            memory_budget=budget,
            return_rows=return_rows,
        )

    def _stage_loader(self, stage: str, split: str) -> FeatureLoader:
        """One loader per (stage, train|val), kept for the whole grid: staged arrays are read
        from the stores once, not once per learning rate or per validation pass. Every learning
        rate sees the same seeded batch order (epoch e of every lr: the same batches). Batches
        carry their store "rows", which a non-finite loss names."""
        key = (stage, split)
        if key not in self._loaders:
            train = split == "train"
            self._loaders[key] = self._loader(
                self._fields(stage),
                self.train_rows if train else self.val_rows,
                self.config.stage_batch_size(stage),
                shuffle=train,
                seed=self._seed(stage, 0),
                return_rows=True,
            )
        return self._loaders[key]

    def _fields(self, stage: str) -> list[Field]:
        config = self.config
        fields = [Field("source", self.source, source_array(config.stitch, config.position))]
        if stage == "lfm":
            fields.append(Field("target", self.target, f"layers/{config.position}"))
        elif stage == "ffm":
            fields.append(Field("target", self.target, "pooled" if config.pooled_only else "final"))
        else:
            fields.append(
                Field("labels", self.target, "labels" if config.task == "cls" else "masks")
            )
        return fields

    # -- one step -------------------------------------------------------------------------------
    def stitched_outputs(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source tokens -> stitched model ``(final, pooled)`` through the frozen target tail."""
        return self.target_encoder.run_from(self.stitch(source), self.config.position)

    def _loss(self, stage: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """(loss, predictions for the task metric or None)."""
        with self.autocast:
            if stage == "lfm":
                return feature_matching_loss(self.stitch(batch["source"]), batch["target"]), None
            final, pooled = self.stitched_outputs(batch["source"])
            if stage == "ffm":
                prediction = pooled if self.config.pooled_only else final
                return feature_matching_loss(prediction, batch["target"]), None
            if self.config.task == "cls":
                logits = self.head(pooled)
                return classification_loss(logits, batch["labels"]), logits.argmax(-1)
            masks = segmentation_targets(batch["labels"], self.num_classes, self.mask_ignore)
            pixels = segmentation_logits(self.head(final), tuple(masks.shape[-2:]))
            return segmentation_loss(pixels, masks), pixels.argmax(1)

    def _trainable(self, stage: str) -> list[nn.Parameter]:
        parameters = [p for p in self.stitch.parameters() if p.requires_grad]
        return parameters + (list(self.head.parameters()) if stage == "tlt" else [])

    def _check_finite(self, loss: torch.Tensor, where: str, stage, lr, epoch, batch) -> None:
        """Raise ``NonFiniteLossError`` for a NaN / inf ``loss`` (before its backward pass)."""
        if not bool(torch.isfinite(loss.detach())):
            rows = format_rows(batch["rows"].cpu())
            raise NonFiniteLossError(
                f"Stage {stage}, lr {lr:g}, epoch {epoch}: expected a finite {where} loss. Got "
                f"{float(loss.detach())} instead, on the batch of {rows}. The features read "
                "were finite, so training diverged: use smaller --lr values."
            )

    @torch.no_grad()
    def _validate(self, stage: str, lr: float, epoch: int) -> tuple[float, float | None, float]:
        """(mean validation loss, task metric: accuracy or mIoU for TLT, else None, seconds
        of forward compute: the loss forwards up to their values on the host)."""
        self.stitch.eval()
        loader = self._stage_loader(stage, "val")
        total, count, compute = 0.0, 0, 0.0
        correct, confusion = 0, ConfusionMatrix(self.num_classes)
        for batch in loader.epoch(0):
            started = time.perf_counter()
            loss, predicted = self._loss(stage, batch)
            self._check_finite(loss, "validation", stage, lr, epoch, batch)
            size = len(batch["source"])
            total += float(loss) * size
            compute += time.perf_counter() - started
            count += size
            if predicted is not None and self.config.task == "cls":
                correct += int((predicted == batch["labels"]).sum())
            elif predicted is not None:
                truth = segmentation_targets(batch["labels"], self.num_classes, self.mask_ignore)
                confusion.update(predicted, truth)
        self.stitch.train()
        if stage != "tlt":
            return total / max(count, 1), None, compute
        task = self.config.task
        metric = correct / max(count, 1) if task == "cls" else confusion.miou(self.config.miou)
        return total / max(count, 1), metric, compute

    # -- checkpointing --------------------------------------------------------------------------
    def _save_checkpoint(self, stage_index, state: _StageState, optimizer, current, overall):
        """Write the training state as checkpoint.json + its tensors file (module docstring).

        ``optimizer`` is that of the learning rate in progress (after one of its epochs), or
        None at a learning-rate boundary, where nothing is in progress: the next learning rate
        starts from the stage's initial stitch, a fresh head and a fresh optimiser.
        """
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        training = None
        if optimizer is not None:
            training = {
                "stitch": self.stitch.state_dict(),
                "head": self.head.state_dict(),
                "optimizer": optimizer.state_dict()["state"],  # param_groups: from the config
            }
        tensors: dict[str, torch.Tensor] = {}
        record = {
            "stage_index": stage_index,
            "state": asdict(state),
            "training": _split_tensors(training, "training", tensors),
            "current": _split_tensors(current, "current", tensors),  # best epoch, lr in progress
            "overall": _split_tensors(overall, "overall", tensors),  # best over finished lrs
            "rng": _split_tensors(rng, "rng", tensors),
            "stage_results": self.stage_results,
            "history": self.history,
        }
        payload = save(tensors)
        digest = hashlib.sha256(payload).hexdigest()
        name = f"checkpoint-{digest[:16]}.safetensors"
        _write_file(self.out / name, payload)
        record["tensors"] = {"file": name, "sha256": digest}
        _write_file(self.out / CHECKPOINT, json.dumps(record).encode())
        for old in self.out.glob("checkpoint-*.safetensors"):
            if old.name != name:
                old.unlink()
        self._last_checkpoint = time.monotonic()

    def _load_checkpoint(self) -> dict | None:
        """The checkpoint's record with its tensors in place, or None when there is none."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            name, digest = record["tensors"]["file"], record["tensors"]["sha256"]
            payload = (self.out / name).read_bytes()
            got = hashlib.sha256(payload).hexdigest()
            problem = None if got == digest else f"{name} has SHA-256 {got}, it names {digest}"
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = " ".join(f"{type(err).__name__}: {err}".split())
        if problem:
            raise FeatcacheError(
                f"Cannot resume from {path}: {problem} (changed outside stitchtrain). Remove "
                f"{path.name} and the checkpoint-*.safetensors files in {self.out} to restart "
                "the run from scratch."
            )
        resume = _join_tensors(record, load(payload))
        if resume["training"] is not None:  # JSON keys are strings; AdamW's are parameter ids
            state = resume["training"]["optimizer"]
            resume["training"]["optimizer"] = {int(k): v for k, v in state.items()}
        return resume

    @contextlib.contextmanager
    def _stop_at_epoch_end_on_sigterm(self):
        """While training: a SIGTERM (a batch scheduler preempting the job) lets the epoch in
        progress finish, then the stage loop checkpoints and raises ``FitStopped``. Only in the
        main thread (signal handlers live there; a Dask worker's fit keeps the default)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame) -> None:
            self._stop_signal = signal.Signals(signum).name

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _restore_rng(self, resume: dict) -> None:
        torch.set_rng_state(resume["rng"]["torch"])
        if "cuda" in resume["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(resume["rng"]["cuda"], self.device)

    # -- the stage loop -------------------------------------------------------------------------
    def _run_stage(self, stage_index: int, resume: dict | None, progress) -> None:
        """Train stage ``stage_index`` over the learning-rate grid, from its start or from
        ``resume`` (a checkpoint written inside this stage), and save its best stitch."""
        stage = self.stages[stage_index]
        if resume is None and self._reuse_stage(stage_index, progress):
            return
        config = self.config
        start = self._initial_state(stage_index)
        state = _StageState(**resume["state"]) if resume else _StageState()
        current = resume["current"] if resume else None  # best epoch of the lr in progress
        overall = resume["overall"] if resume else None  # best over the finished lrs
        while state.lr_index < len(config.lrs):
            lr = config.lrs[state.lr_index]
            torch.manual_seed(self._seed(stage, state.lr_index))
            self.stitch.load_state_dict(start)
            self.head = self._new_head()
            if stage == "tlt" and config.head == "probe":  # the same start for every lr
                self.head.load_state_dict(self._probe_head()["state"])
            optimizer = torch.optim.AdamW(
                self._trainable(stage), lr=lr, weight_decay=config.weight_decay
            )
            if resume is not None and resume["training"] is not None:  # inside this lr
                training = resume["training"]
                self.stitch.load_state_dict(training["stitch"])
                self.head.load_state_dict(training["head"])
                groups = optimizer.state_dict()["param_groups"]
                optimizer.load_state_dict({"state": training["optimizer"], "param_groups": groups})
                self._restore_rng(resume)
            resume = None  # a checkpoint at this lr's boundary: it starts fresh, as above
            loader = self._stage_loader(stage, "train")
            at = {"stage": stage, "lr": lr, "epochs": config.epochs}  # progress events
            if progress is not None:
                grid = {"lr_index": state.lr_index, "lrs": len(config.lrs), "epoch": state.epoch}
                progress({"event": "lr_start", **at, **grid, "stage_index": stage_index,
                          "stages": list(self.stages)})  # fmt: skip
            while state.epoch < config.epochs and state.stale < config.patience:
                row = self._train_epoch(stage, lr, state.epoch, loader, optimizer, state)
                self.history.append(row)
                if row["val_loss"] < state.best_loss:
                    state.best_loss, state.best_epoch, state.stale = row["val_loss"], state.epoch, 0
                    current = {
                        "stitch": _snapshot(self.stitch),
                        "head": _snapshot(self.head),
                        "val_loss": row["val_loss"],
                        "val_metric": row["val_metric"],
                        "lr_index": state.lr_index,
                    }
                else:
                    state.stale += 1
                state.epoch += 1
                due = time.monotonic() - self._last_checkpoint >= self.checkpoint_every
                if due or self._stop_signal:
                    self._save_checkpoint(stage_index, state, optimizer, current, overall)
                if self._stop_signal:
                    raise FitStopped(
                        f"Stopped by {self._stop_signal} after epoch {state.epoch} of stage "
                        f"{stage}, lr {lr:g}: the checkpoint in {self.out} holds the run so far; "
                        "the same command resumes it."
                    )
                if progress is not None:
                    progress({**row, "event": "epoch", "epochs": config.epochs})
            state.finished.append(
                {
                    "lr": lr,
                    "val_loss": current["val_loss"],
                    "val_metric": current["val_metric"],
                    "best_epoch": state.best_epoch,
                }
            )
            if progress is not None:
                ran = {"epochs_run": state.epoch, "stopped_early": state.epoch < config.epochs}
                progress({"event": "lr_done", **at, **state.finished[-1], **ran})
            overall = _better(overall, current, stage)
            current = None
            state = _StageState(lr_index=state.lr_index + 1, finished=state.finished)
            self._save_checkpoint(stage_index, state, None, current, overall)
        if resume is not None:  # written after the grid: the RNG state is all that carries on
            self._restore_rng(resume)
        self.stitch.load_state_dict(overall["stitch"])
        self.head.load_state_dict(overall["head"])
        stitch_file = save(_contiguous(overall["stitch"]))
        _write_file(self.out / f"stitch-{stage}.safetensors", stitch_file)
        if stage == "tlt":
            save_file(_contiguous(overall["head"]), str(self.out / "head.safetensors"))
        self.stage_results[stage] = {
            "lr": config.lrs[overall["lr_index"]],
            "grid": state.finished,
            "val_loss": overall["val_loss"],
            "val_metric": overall["val_metric"],
        }
        if stage != "tlt":
            self._write_stage_record(stage_index, stitch_file)
        if stage == "tlt" and config.head == "probe":
            probe = self._probe_head()
            self.stage_results[stage]["head_init"] = {
                "from": "target probe" if config.task == "cls" else "target linear decoder",
                **{k: probe[k] for k in ("lr", "val_metric", "epochs")},
            }

    # -- shared stages (module docstring) ------------------------------------------------------
    def stage_key(self, stage_index: int) -> dict[str, Any]:
        """What decides stage ``stage_index``'s outcome, as JSON: two runs with equal keys
        train that stage identically (up to the float reduction order of their threads)."""
        stages = self.stages[: stage_index + 1]
        config = json.loads(json.dumps(asdict(self.config)))
        for name in _NOT_IN_STAGE_KEY:
            config.pop(name)
        if "tlt" not in stages:  # the head option is read by the TLT stage only
            config["head"] = HEADS[0]
        rows = {"train": self.train_rows.tolist(), "val": self.val_rows.tolist()}
        return {
            "config": config,
            "stages": stages,
            "stores": [self.source.attrs["store_id"], self.target.attrs["store_id"]],
            "rows": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
            "device": self.device.type,
            "torch": torch.__version__,
        }

    def _write_stage_record(self, stage_index: int, stitch_file: bytes) -> None:
        """``stage-<stage>.json``: the key, result and history rows of a finished LFM / FFM
        stage and its stitch file's SHA-256 (written after that file, atomically)."""
        stage = self.stages[stage_index]
        result = {k: v for k, v in self.stage_results[stage].items() if k != "reused_from"}
        record = {
            "key": self.stage_key(stage_index),
            "result": result,
            "history": [row for row in self.history if row["stage"] == stage],
            "stitch_sha256": hashlib.sha256(stitch_file).hexdigest(),
        }
        _write_file(self.out / f"stage-{stage}.json", json.dumps(record, indent=1).encode())

    def reusable_stage(self, stage_index: int) -> tuple[Path, dict, bytes] | None:
        """(run dir, stage record, stitch file bytes) of the first ``reuse`` run dir that
        finished stage ``stage_index`` as this run would (same key, intact stitch file), or
        None (TLT: never, it trains the head)."""
        stage = self.stages[stage_index]
        if stage == "tlt" or not self.reuse:
            return None
        key = self.stage_key(stage_index)
        shapes = {k: tuple(v.shape) for k, v in self.stitch.state_dict().items()}
        for run_dir in self.reuse:
            found = _finished_stage(run_dir, stage, key, shapes)
            if found is not None:
                return (run_dir, *found)
        return None

    def _reuse_stage(self, stage_index: int, progress) -> bool:
        """Take stage ``stage_index`` (stitch file, result, history rows) from the run dir
        ``reusable_stage`` finds; False when there is none."""
        found = self.reusable_stage(stage_index)
        if found is None:
            return False
        run_dir, record, stitch_file = found
        stage = self.stages[stage_index]
        _write_file(self.out / f"stitch-{stage}.safetensors", stitch_file)
        self.stitch.load_state_dict(load(stitch_file))
        self.history.extend(record["history"])
        self.stage_results[stage] = {**record["result"], "reused_from": str(run_dir)}
        self._write_stage_record(stage_index, stitch_file)
        if progress is not None:
            progress({"event": "stage_reused", "stage": stage, "stage_index": stage_index,
                      "stages": list(self.stages), "from": str(run_dir),
                      "val_loss": record["result"]["val_loss"]})  # fmt: skip
        return True

    def _train_epoch(self, stage, lr, epoch, loader, optimizer, state=None) -> dict[str, Any]:
        """One pass over the training rows, then validation; the history row of that epoch.
        Each step's learning rate is ``scheduled_lr`` of ``state.step`` (counted on)."""
        config = self.config
        state = state if state is not None else _StageState(epoch=epoch, step=epoch * len(loader))
        started = time.perf_counter()
        total, count, compute = 0.0, 0, 0.0
        wait_before = loader.stats.wait_seconds
        for batch in loader.epoch(epoch):
            step_start = time.perf_counter()
            loss, _ = self._loss(stage, batch)
            self._check_finite(loss, "training", stage, lr, epoch, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step_lr = scheduled_lr(
                lr, state.step, len(loader), config.epochs, config.warmup_epochs, config.lr_schedule
            )
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            optimizer.step()
            state.step += 1
            total += float(loss.detach()) * len(batch["source"])
            count += len(batch["source"])
            compute += time.perf_counter() - step_start
        val_loss, val_metric, val_compute = self._validate(stage, lr, epoch)
        return {
            "stage": stage,
            "lr": lr,
            "epoch": epoch,
            "train_loss": total / max(count, 1),
            "val_loss": val_loss,
            "val_metric": val_metric,
            "seconds": round(time.perf_counter() - started, 4),
            "data_wait_s": round(loader.stats.wait_seconds - wait_before, 4),
            "compute_s": round(compute, 4),
            "val_compute_s": round(val_compute, 4),
            "data_gb_per_s": round(loader.stats.gb_per_s, 4),
        }

    def run(self, progress=None, log=None) -> dict[str, Any]:
        """Train every stage (resuming from the checkpoint if there is one), evaluate, save;
        return the metrics (a finished run dir: its metrics.json, at once). ``progress`` gets
        event dicts: "lr_start", "epoch" (a history row), "lr_done", "evaluate" (the keys:
        cli._progress.FitProgress). ``log`` gets one
        line per incomplete store used (``allow_incomplete``); default: warnings of this
        module's logger."""
        from stitchtrain.evaluate.evaluation import evaluate_run, evaluation_split

        finished = _finished_metrics(self.out, self.config)
        if finished is not None:
            return finished
        split = evaluation_split(self)  # test stores are refused here, before any training step
        incomplete = {**self.incomplete, **split.incomplete}
        for url, note in incomplete.items():
            (log or _log.warning)(
                f"{url}: {len(note['unmarked_shards'])} of {note['num_shards']} shards have no "
                f"completion marker; using the marked shards only, {note['rows_used']} of "
                f"{note['num_rows']} rows."
            )
        self.out.mkdir(parents=True, exist_ok=True)
        _write_or_check_config(self.out, self.config)
        resume = self._load_checkpoint()
        self._last_checkpoint = time.monotonic()
        self.stage_results = dict(resume["stage_results"]) if resume else {}
        self.history = list(resume["history"]) if resume else []
        first = resume["stage_index"] if resume else 0
        with self._stop_at_epoch_end_on_sigterm():
            for stage_index in range(first, len(self.stages)):
                self._run_stage(stage_index, resume if stage_index == first else None, progress)
        final_stage = self.stages[-1]
        save_file(_contiguous(self.stitch.state_dict()), str(self.out / "stitch.safetensors"))
        _write_history(self.out / "history.csv", self.history)
        if progress is not None:
            progress({"event": "evaluate"})
        metrics = evaluate_run(self.out, recipe=self, split=split)
        metrics["train_rows"], metrics["val_rows"] = len(self.train_rows), len(self.val_rows)
        if incomplete:
            metrics["incomplete_stores"] = incomplete
        metrics["stages"] = self.stage_results
        metrics["final_stage"] = final_stage
        metrics["protocol"] = self.protocol()
        _write_file(self.out / "metrics.json", json.dumps(metrics, indent=2).encode())
        _remove_checkpoint(self.out)
        return metrics


# options that only later stages or the test evaluation read, or that name the run itself
_NOT_IN_STAGE_KEY = (
    "out", "objective", "source_test", "target_test", "seg_decoder", "miou", "score_resolution",
    "device",  # its resolved type is in the key
)  # fmt: skip


_STAGE_RESULT = ("lr", "grid", "val_loss", "val_metric")  # the keys a stage record's result has


def _finished_stage(
    run_dir: Path, stage: str, key: dict, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict, bytes] | None:
    """(stage record, stitch file bytes) of ``run_dir``'s finished ``stage`` when its key is
    ``key``, its result and history rows are well formed and its stitch file has the recorded
    SHA-256 and the stitch's tensor ``shapes``; else None (absent, other, changed, damaged)."""
    try:
        record = json.loads((run_dir / f"stage-{stage}.json").read_text())
        stitch_file = (run_dir / f"stitch-{stage}.safetensors").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    result, history = record.get("result"), record.get("history")
    if not (isinstance(result, dict) and all(k in result for k in _STAGE_RESULT)):
        return None
    if not (isinstance(history, list) and history):
        return None
    if not all(isinstance(row, dict) and row.get("stage") == stage for row in history):
        return None
    if hashlib.sha256(stitch_file).hexdigest() != record.get("stitch_sha256"):
        return None
    try:
        tensors = load(stitch_file)
    except Exception:  # safetensors raises its own error types for a malformed file
        return None
    if {k: tuple(v.shape) for k, v in tensors.items()} != shapes:
        return None
    return record, stitch_file


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _better(overall: dict | None, candidate: dict, stage: str) -> dict:
    """Keep the better of two learning rates' best epochs by validation: the task metric
    (higher) for TLT, the validation loss (lower) for feature matching; ties keep the first."""
    if overall is None:
        return candidate
    if stage == "tlt":
        wins = (candidate["val_metric"], -candidate["val_loss"]) > (
            overall["val_metric"],
            -overall["val_loss"],
        )
    else:
        wins = candidate["val_loss"] < overall["val_loss"]
    return candidate if wins else overall


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _write_or_check_config(out: Path, config: FitConfig) -> None:
    path = out / "config.json"
    if not _check_config(out, config):
        path.write_text(json.dumps(json.loads(json.dumps(asdict(config))), indent=2))


def _check_config(out: Path, config: FitConfig) -> bool:
    """Whether ``out`` has a config.json (refused when it is another config's)."""
    path = out / "config.json"
    current = json.loads(json.dumps(asdict(config)))
    if path.exists():
        # a field added since the run dir was made (allow_incomplete) counts as its default
        defaults = {f.name: f.default for f in dataclass_fields(FitConfig)}
        defaults = {k: v for k, v in defaults.items() if v is not MISSING}
        saved = {**json.loads(json.dumps(defaults)), **json.loads(path.read_text())}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise FeatcacheError(
                f"Run dir {out} was started with a different config ({', '.join(changed)} "
                "differ). Use another --out, or the original options to resume."
            )
        return True
    return False


def _write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _finished_metrics(out: Path, config: FitConfig) -> dict | None:
    """metrics.json of a finished run dir, else None; a run dir of another config is refused."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    _write_or_check_config(out, config)
    _remove_checkpoint(out)  # left by a kill between metrics.json and the cleanup
    return json.loads(path.read_text())


def _remove_checkpoint(out: Path) -> None:
    for path in out.glob("checkpoint*"):  # the JSON, tensors files, temp files of a kill
        path.unlink()


def _write_file(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically: temp file naming this writer, fsync, rename."""
    write_atomic(str(path), [data], sync=True)


def _split_tensors(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``value`` (nested dicts / lists), each tensor moved into
    ``tensors[key/...]`` (a CPU copy) and replaced by ``{"__tensor__": key/...}``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {str(k): _split_tensors(v, f"{key}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``_split_tensors``."""
    if isinstance(value, dict):
        if value.keys() == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


def fit(
    config: FitConfig,
    progress=None,
    log=None,
    checkpoint_every: float = CHECKPOINT_EVERY_S,
    reuse: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """The API behind ``stitchtrain fit``: a finished run dir's metrics at once, else
    ``StitchRecipe(config, checkpoint_every, reuse).run(progress, log)``."""
    checkpoint_interval(checkpoint_every)
    finished = _finished_metrics(Path(config.out), config)
    if finished is not None:
        return finished
    check_run_dir(Path(config.out), config)  # before opening a store or loading an encoder
    return StitchRecipe(config, checkpoint_every, reuse).run(progress, log)


def checkpoint_interval(seconds: Any) -> float:
    """``seconds`` as the epoch-checkpoint interval (a number >= 0; inf: lr boundaries only)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise FeatcacheError(f"Expected --checkpoint-every >= 0 seconds. Got {seconds!r} instead.")
    return float(seconds)


def check_run_dir(out: Path, config: FitConfig) -> str:
    """The state of run dir ``out`` for ``config``, writing nothing: "fresh" (no config.json
    yet), "resumable" (a checkpoint to continue from), "started" (config.json, no checkpoint:
    it starts over) or "finished" (metrics.json). A run dir of another config is refused."""
    if out.exists() and not out.is_dir():
        raise FeatcacheError(
            f"Expected --out to be a directory (or a new path). Got the file {out} instead."
        )
    if not (out / "config.json").is_file():
        return "fresh"
    _check_config(out, config)
    if (out / "metrics.json").is_file():
        return "finished"
    return "resumable" if (out / CHECKPOINT).is_file() else "started"
