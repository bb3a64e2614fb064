"""What defines a fit: ``FitConfig`` (written to config.json, checked on resume), the values its
options accept, the learning-rate schedule it names, and the errors a fit raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from featcache.errors import FeatcacheError, Interrupted
from stitchtrain.data.loader import parse_size
from stitchtrain.scoring.metrics import MIOU_DEFINITIONS
from stitchtrain.scoring.segscore import SCORE_RESOLUTIONS

__all__ = [
    "FitConfig",
    "NonFiniteLossError",
    "FitStopped",
    "OBJECTIVES",
    "STITCHES",
    "INITS",
    "HEADS",
    "LR_SCHEDULES",
    "SEG_DECODERS",
    "scheduled_lr",
]


class NonFiniteLossError(FeatcacheError, FloatingPointError):
    """A NaN or infinite training or validation loss."""


class FitStopped(Interrupted):
    """A SIGINT (Ctrl-C) or SIGTERM stopped the fit: at an epoch's end, after writing a
    checkpoint there, or at once on a second signal, keeping the last checkpoint. Exit status
    130 (SIGINT) or 143 (SIGTERM)."""


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
