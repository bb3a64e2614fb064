"""``stitchtrain fit``: one readable training recipe for a stitch layer (paper sections 3-5).

    setup     open and pair the stores, split train rows into train / validation, load the
              frozen target encoder (FFM, TLT, evaluation) and check its fingerprint
    stages    the objective's stages in order ("ffm+tlt" = FFM, then TLT from the FFM stitch);
              each stage trains one stitch per learning rate in the grid with early stopping on
              the validation loss and keeps the best by validation metric
    evaluate  test-split accuracy / mIoU and the Figure 2 feature distances (``evaluate.py``)
    save      config.json, stitch.safetensors, head.safetensors, history.csv, metrics.json

Per stage, one optimisation step on a batch of B rows:
    lfm   loss = mse(S(src_n), tgt_n)                                 no encoder runs
    ffm   loss = mse(T(S(src_n)).final, tgt_final)   (pooled-only: .pooled vs tgt_pooled)
    tlt   loss = CE(head(T(S(src_n)).pooled), y)     (seg: per-patch head on final, upsampled)
where T is the frozen target tail (blocks n+1..N, final norm, pooling): forward and backward to
the stitch, no weight gradients in the tail. The LoRA stitch reads src_{n-1} instead.

Resuming: after every epoch the complete training state (stitch, head, optimiser, early-stopping
state, finished learning rates, history) is written atomically to ``checkpoint.pt``. The same
command on the same run dir continues from there; every random choice is seeded from
(seed, stage, learning rate, epoch), so a resumed run ends with the metrics of an uninterrupted
one. A run dir made with a different config is refused.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from featcache.encoders import Encoder, TokenLayout, load_encoder
from featcache.errors import FeatcacheError
from featcache.extract import resolve_device
from featcache.store import FeatureStore
from stitchtrain.loader import FeatureLoader, Field, parse_size, split_rows, valid_rows
from stitchtrain.losses import (
    classification_loss,
    feature_matching_loss,
    segmentation_logits,
    segmentation_loss,
)
from stitchtrain.metrics import ConfusionMatrix
from stitchtrain.pairing import check_pair, source_array
from stitchtrain.stitches import Stitch, build_stitch

__all__ = ["FitConfig", "StitchRecipe", "fit", "load_run_encoder", "OBJECTIVES"]

OBJECTIVES = ("lfm", "ffm", "tlt", "ffm+tlt", "lfm+tlt")
STITCHES = ("linear", "mlp", "lora")
INITS = ("random", "lstsq", "identity")


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

    def __post_init__(self) -> None:
        self.lrs = tuple(float(lr) for lr in self.lrs)
        checks = [
            (self.stitch in STITCHES, f"--stitch in {STITCHES}", self.stitch),
            (self.objective in OBJECTIVES, f"--objective in {OBJECTIVES}", self.objective),
            (self.task in ("cls", "seg"), "--task cls or seg", self.task),
            (self.init in INITS, f"--init in {INITS}", self.init),
            (self.lrs and all(lr > 0 for lr in self.lrs), "positive --lr values", self.lrs),
            (self.epochs >= 1 and self.patience >= 1, "--epochs, --patience >= 1", self.epochs),
            (0 < self.val_fraction < 1, "0 < --val-fraction < 1", self.val_fraction),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise FeatcacheError(f"Expected {expected}. Got {got!r} instead.")
        if self.init == "lstsq" and self.stitch != "linear":
            raise FeatcacheError(f"--init lstsq fits a linear stitch. Got --stitch {self.stitch}.")

    def stage_batch_size(self, stage: str) -> int:
        return self.batch_size or (256 if stage == "lfm" else 128)


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
    """Progress through one stage's learning-rate grid, checkpointed every epoch."""

    lr_index: int = 0
    epoch: int = 0
    best_loss: float = math.inf  # of the lr in progress
    best_epoch: int = -1
    stale: int = 0  # epochs since the validation loss last improved
    finished: list[dict[str, Any]] = field(default_factory=list)  # per finished lr


class StitchRecipe:
    """Setup, the stage loop, evaluation and saving for one ``FitConfig``."""

    def __init__(self, config: FitConfig) -> None:
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
        check_pair(
            self.source,
            self.target,
            position=config.position,
            stitch=config.stitch,
            objective=config.objective,
            task=config.task,
            pooled_only=config.pooled_only,
        )
        rows = valid_rows(self.source, self.target)
        self.train_rows, self.val_rows = split_rows(rows, config.val_fraction, config.seed)
        self.stages = config.objective.split("+")
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
        self._loaders: dict[tuple[str, str], FeatureLoader] = {}

    # -- construction ---------------------------------------------------------------------------
    def _num_classes(self) -> int:
        if self.config.task == "cls":
            return max(len(self.target.attrs["dataset"]["classes"]), 1)
        masks = self.target.read("masks")
        return int(masks.max()) + 1

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

    def _seed(self, stage: str, lr_index: int) -> int:
        return self.config.seed * 1000 + self.stages.index(stage) * 10 + lr_index

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
    def _loader(self, fields, rows, batch_size, *, shuffle: bool, seed: int = 0) -> FeatureLoader:
        budget = parse_size(self.config.memory_budget) if self.config.memory_budget else None
        return FeatureLoader(
            fields,
            rows,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            device=self.device,
            memory_budget=budget,
        )

    def _stage_loader(self, stage: str, split: str) -> FeatureLoader:
        """One loader per (stage, train|val), kept for the whole grid: staged arrays are read
        from the stores once, not once per learning rate or per validation pass. Every learning
        rate sees the same seeded batch order (epoch e of every lr: the same batches)."""
        key = (stage, split)
        if key not in self._loaders:
            train = split == "train"
            self._loaders[key] = self._loader(
                self._fields(stage),
                self.train_rows if train else self.val_rows,
                self.config.stage_batch_size(stage),
                shuffle=train,
                seed=self._seed(stage, 0),
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
            masks = batch["labels"].long()
            pixels = segmentation_logits(self.head(final), tuple(masks.shape[-2:]))
            return segmentation_loss(pixels, masks), pixels.argmax(1)

    def _trainable(self, stage: str) -> list[nn.Parameter]:
        parameters = [p for p in self.stitch.parameters() if p.requires_grad]
        return parameters + (list(self.head.parameters()) if stage == "tlt" else [])

    @torch.no_grad()
    def _validate(self, stage: str) -> tuple[float, float | None]:
        """(mean validation loss, task metric: accuracy or mIoU for TLT, else None)."""
        self.stitch.eval()
        loader = self._stage_loader(stage, "val")
        total, count = 0.0, 0
        correct, confusion = 0, ConfusionMatrix(self.num_classes)
        for batch in loader.epoch(0):
            loss, predicted = self._loss(stage, batch)
            size = len(batch["source"])
            total += float(loss) * size
            count += size
            if predicted is not None and self.config.task == "cls":
                correct += int((predicted == batch["labels"]).sum())
            elif predicted is not None:
                confusion.update(predicted, batch["labels"])
        self.stitch.train()
        if stage != "tlt":
            return total / max(count, 1), None
        metric = correct / max(count, 1) if self.config.task == "cls" else confusion.miou()
        return total / max(count, 1), metric

    # -- checkpointing --------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _save_checkpoint(self, stage_index, state: _StageState, optimizer, current, overall):
        payload = {
            "stage_index": stage_index,
            "state": asdict(state),
            "stitch": self.stitch.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "current": current,
            "overall": overall,
            "history": self.history,
        }
        tmp = self._checkpoint_path().with_suffix(".pt.partial")
        torch.save(payload, tmp)
        os.replace(tmp, self._checkpoint_path())

    def _load_checkpoint(self) -> dict | None:
        if not self._checkpoint_path().exists():
            return None
        return torch.load(self._checkpoint_path(), map_location=self.device, weights_only=True)

    # -- the stage loop -------------------------------------------------------------------------
    def _run_stage(self, stage_index: int, resume: dict | None, progress) -> None:
        stage = self.stages[stage_index]
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
            optimizer = torch.optim.AdamW(self._trainable(stage), lr=lr)
            if resume is not None:
                self.stitch.load_state_dict(resume["stitch"])
                self.head.load_state_dict(resume["head"])
                optimizer.load_state_dict(resume["optimizer"])
                resume = None
            loader = self._stage_loader(stage, "train")
            while state.epoch < config.epochs and state.stale < config.patience:
                row = self._train_epoch(stage, lr, state.epoch, loader, optimizer)
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
                self._save_checkpoint(stage_index, state, optimizer, current, overall)
                if progress is not None:
                    progress(row)
            state.finished.append(
                {
                    "lr": lr,
                    "val_loss": current["val_loss"],
                    "val_metric": current["val_metric"],
                    "best_epoch": state.best_epoch,
                }
            )
            overall = _better(overall, current, stage)
            current = None
            state = _StageState(lr_index=state.lr_index + 1, finished=state.finished)
            self._save_checkpoint(stage_index, state, optimizer, current, overall)
        self.stitch.load_state_dict(overall["stitch"])
        self.head.load_state_dict(overall["head"])
        save_file(_contiguous(overall["stitch"]), str(self.out / f"stitch-{stage}.safetensors"))
        if stage == "tlt":
            save_file(_contiguous(overall["head"]), str(self.out / "head.safetensors"))
        self.stage_results[stage] = {
            "lr": config.lrs[overall["lr_index"]],
            "grid": state.finished,
            "val_loss": overall["val_loss"],
            "val_metric": overall["val_metric"],
        }

    def _train_epoch(self, stage, lr, epoch, loader, optimizer) -> dict[str, Any]:
        """One pass over the training rows, then validation; the history row of that epoch."""
        started = time.perf_counter()
        total, count, compute = 0.0, 0, 0.0
        wait_before = loader.stats.wait_seconds
        for batch in loader.epoch(epoch):
            step_start = time.perf_counter()
            loss, _ = self._loss(stage, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch["source"])
            count += len(batch["source"])
            compute += time.perf_counter() - step_start
        val_loss, val_metric = self._validate(stage)
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
            "data_gb_per_s": round(loader.stats.gb_per_s, 4),
        }

    def run(self, progress=None) -> dict[str, Any]:
        """Train every stage (resuming if a checkpoint exists), evaluate, save; return metrics."""
        from stitchtrain.evaluate import evaluate_run

        self.out.mkdir(parents=True, exist_ok=True)
        _write_or_check_config(self.out, self.config)
        resume = self._load_checkpoint()
        self.stage_results: dict[str, Any] = {}
        if resume is not None:
            self.history = list(resume["history"])
            results_path = self.out / "stage_results.json"
            if results_path.exists():
                self.stage_results = json.loads(results_path.read_text())
        first = resume["stage_index"] if resume else 0
        for stage_index in range(first, len(self.stages)):
            stage_resume = resume if (resume and stage_index == resume["stage_index"]) else None
            self._run_stage(stage_index, stage_resume, progress)
            (self.out / "stage_results.json").write_text(json.dumps(self.stage_results, indent=2))
            resume = None
        final_stage = self.stages[-1]
        save_file(_contiguous(self.stitch.state_dict()), str(self.out / "stitch.safetensors"))
        _write_history(self.out / "history.csv", self.history)
        metrics = evaluate_run(self.out, recipe=self)
        metrics["stages"] = self.stage_results
        metrics["final_stage"] = final_stage
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self._checkpoint_path().unlink(missing_ok=True)
        return metrics


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
    current = json.loads(json.dumps(asdict(config)))
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise FeatcacheError(
                f"Run dir {out} was started with a different config ({', '.join(changed)} "
                "differ). Use another --out, or the original options to resume."
            )
        return
    path.write_text(json.dumps(current, indent=2))


def _write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def fit(config: FitConfig, progress=None) -> dict[str, Any]:
    """Run ``StitchRecipe(config)``; the API behind ``stitchtrain fit``."""
    return StitchRecipe(config).run(progress)
