"""``StitchTrainer``: setup and training of a stitch layer for one ``FitConfig`` (paper sections
3-5); ``stitchtrain.pipeline.fit`` adds the test evaluation and metrics.json.

    setup     open and check the stores (``integrity.usable_rows``: stores with unmarked shards
              are refused unless ``allow_incomplete``), pair them, split train rows into train /
              validation, load the frozen target encoder (FFM, TLT, evaluation) and check its
              fingerprint
    stages    the objective's stages in order ("ffm+tlt" = FFM, then TLT from the FFM stitch);
              each stage trains one stitch per learning rate in the grid with early stopping on
              the validation loss and keeps the best by validation metric (``train``)

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

Epochs count from 1 wherever they are read: history.csv's ``epoch``, metrics.json's
``best_epoch`` (per learning rate of a stage's ``grid``), progress events and messages. The
loop's own counter (``_StageState.epoch``: the epochs done, which seeds each epoch's batch order)
counts from 0. A checkpoint written before that convention records no digest and is refused
(``checkpoint.Checkpoints``), saying which files to remove to start the run again.

Checkpoints and resume: ``checkpoint.Checkpoints``; shared stages (``reuse``):
``stages.SharedStages``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from featcache.errors import FeatcacheError, Interrupted
from featcache.extract import resolve_device
from featcache.interrupts import stop_requested
from featcache.store import FeatureStore
from stitchtrain.data.integrity import format_rows, usable_rows
from stitchtrain.data.loader import FeatureLoader, Field, parse_size, split_rows
from stitchtrain.data.pairing import check_pair, source_array
from stitchtrain.model.losses import (
    classification_loss,
    feature_matching_loss,
    segmentation_logits,
    segmentation_loss,
    segmentation_targets,
)
from stitchtrain.model.stitches import Stitch, build_stitch, stitched_outputs
from stitchtrain.scoring.metrics import ConfusionMatrix
from stitchtrain.train.checkpoint import (
    CHECKPOINT_EVERY_S,
    Checkpoints,
    _contiguous,
    _snapshot,
    checkpoint_interval,
    resume_message,
)
from stitchtrain.train.config import FitConfig, FitStopped, NonFiniteLossError, scheduled_lr
from stitchtrain.train.encoders import _layout, load_run_encoder
from stitchtrain.train.heads import _SegHead, fit_probe_head, mask_ignore_value, mask_num_classes
from stitchtrain.train.rundir import (
    _write_history,
    _write_or_check_config,
    checkpoint_files,
    remove_stale_temp_files,
    write_file,
)
from stitchtrain.train.stages import SharedStages, _better, _StageState, read_stage_record

__all__ = ["StitchTrainer"]


class StitchTrainer(Checkpoints, SharedStages):
    """Setup and the stage loop for one ``FitConfig``."""

    def __init__(
        self,
        config: FitConfig,
        checkpoint_every: float = CHECKPOINT_EVERY_S,
        reuse: Sequence[str | Path] = (),
    ) -> None:
        self.checkpoint_every = checkpoint_interval(checkpoint_every)  # not in the config
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
        """``--head probe``: the TLT head every learning rate starts from
        (``heads.fit_probe_head``), fitted once (cached)."""
        if self._probe_cache is None:
            self._probe_cache = fit_probe_head(self)
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
        """The stitch a stage starts from: fresh (first stage) or the previous stage's best, its
        ``stitch-<stage>.safetensors`` checked against its stage record (``read_stage_record``:
        a plain file in the run dir with the recorded SHA-256); else a one-line refusal."""
        if stage_index > 0:
            previous = self.stages[stage_index - 1]
            try:
                return load(read_stage_record(self.out, previous)[1])
            except (OSError, ValueError) as err:
                problem = str(err) if type(err) is ValueError else f"{type(err).__name__}: {err}"
                raise FeatcacheError(
                    f"Cannot start stage {self.stages[stage_index]} of {self.out} from the "
                    f"{previous} stage's stitch: {' '.join(problem.split())}. Remove "
                    f"{checkpoint_files(self.out)} to restart the run from scratch."
                ) from None
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
        return stitched_outputs(self.stitch, self.target_encoder, source, self.config.position)

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
        """Raise ``NonFiniteLossError`` for a NaN / inf ``loss`` (before its backward pass);
        ``epoch`` is the loop's (from 0), the message counts from 1."""
        if not bool(torch.isfinite(loss.detach())):
            rows = format_rows(batch["rows"].cpu())
            raise NonFiniteLossError(
                f"Stage {stage}, lr {lr:g}, epoch {epoch + 1}: expected a finite {where} loss. Got "
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
                    state.best_loss, state.stale = row["val_loss"], 0
                    state.best_epoch = row["epoch"]  # from 1, as the history row
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
                stop = stop_requested()  # a SIGINT / SIGTERM during this epoch
                if due or stop:
                    self._save_checkpoint(stage_index, state, optimizer, current, overall)
                if progress is not None:
                    progress({**row, "event": "epoch", "epochs": config.epochs})
                if stop:
                    raise FitStopped(
                        f"Stopped by {stop} after epoch {state.epoch} of stage {stage}, lr "
                        f"{lr:g}: the checkpoint in {self.out} holds the run so far; the same "
                        "command resumes it.",
                        stop,
                    )
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
        write_file(self.out / f"stitch-{stage}.safetensors", stitch_file)
        if stage == "tlt":
            write_file(self.out / "head.safetensors", save(_contiguous(overall["head"])))
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

    def _train_epoch(self, stage, lr, epoch, loader, optimizer, state=None) -> dict[str, Any]:
        """One pass over the training rows, then validation; the history row of that epoch
        (``epoch``: the loop's, from 0; the row's counts from 1). Each step's learning rate is
        ``scheduled_lr`` of ``state.step`` (counted on)."""
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
            "epoch": epoch + 1,
            "train_loss": total / max(count, 1),
            "val_loss": val_loss,
            "val_metric": val_metric,
            "seconds": round(time.perf_counter() - started, 4),
            "data_wait_s": round(loader.stats.wait_seconds - wait_before, 4),
            "compute_s": round(compute, 4),
            "val_compute_s": round(val_compute, 4),
            "data_gb_per_s": round(loader.stats.gb_per_s, 4),
        }

    # -- the run ---------------------------------------------------------------------------------
    def train(self, progress=None) -> None:
        """Train every stage, resuming from the checkpoint if there is one; writes config.json
        (or checks it), each stage's files, stitch.safetensors and history.csv. ``progress``
        gets event dicts: "resume" (its message: where a resumed run starts), "lr_start",
        "epoch" (a history row), "lr_done", "stage_reused". A SIGINT (Ctrl-C) or SIGTERM
        stops the run at the end of the epoch in progress, checkpointed; a second at once
        (``FitStopped``, module ``checkpoint``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        _write_or_check_config(self.out, self.config)
        remove_stale_temp_files(self.out)  # left by a killed fit of this run dir
        resume = self._load_checkpoint()
        self._last_checkpoint = time.monotonic()
        self.stage_results = dict(resume["stage_results"]) if resume else {}
        self.history = list(resume["history"]) if resume else []
        first = resume["stage_index"] if resume else 0
        if resume is not None and progress is not None:
            message = resume_message(self.stages, self.config, resume, self.out)
            progress({"event": "resume", "message": message})
        with self._stop_at_epoch_end_on_signal():
            try:
                for stage_index in range(first, len(self.stages)):
                    resume_here = resume if stage_index == first else None
                    self._run_stage(stage_index, resume_here, progress)
            except Interrupted as err:  # a second signal, anywhere in the loop
                if isinstance(err, FitStopped):
                    raise
                raise self._stopped_at_once(err.signal_name) from None
        write_file(self.out / "stitch.safetensors", save(_contiguous(self.stitch.state_dict())))
        _write_history(self.out / "history.csv", self.history)
