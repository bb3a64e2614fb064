"""The stages of a fit: the progress through one stage's learning-rate grid, the choice of its best
learning rate, and the stage records that let runs share a finished stage (``SharedStages``, a
part of ``StitchTrainer``).

Shared stages: an LFM or FFM stage is the same computation in every run whose config agrees on
what decides it (``SharedStages.stage_key``: the config without the later stages, the test
stores and the scoring options; the stages up to it; the stores' ids, the train / validation
rows, the device and the torch version), e.g. the FFM stage of ``ffm`` and of ``ffm+tlt`` at
one position. ``stage-<stage>.json`` records that key, the stage's result and history rows, its
stitch file's name (``stitch-<stage>.safetensors``) and SHA-256, and ``digest``
(``rundir.record_digest``: SHA-256 of all the rest); given ``reuse`` run dirs, a stage whose key
and hash one of them holds is taken from it (``metrics.json``: ``stages.<stage>.reused_from``)
instead of trained. A record is not taken (the stage is trained) unless it parses (JSON nested
too deeply does not), its digest covers what it says (an edited key, result or history is not
taken), and its stitch file is the plain name ``stitch-<stage>.safetensors`` inside its run dir
(no path, no symlink) with the recorded hash and the stitch's shapes. The stitch a run's next
stage starts from (``stitch-<prev>.safetensors`` in its own run dir) is read the same way
(``read_stage_record``), and a stitch file that fails it is refused, not trained from.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

from stitchtrain.train.config import HEADS
from stitchtrain.train.rundir import read_json, record_digest, run_dir_file, write_file

__all__ = ["SharedStages", "read_stage_record"]


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


class SharedStages:
    """The shared-stage methods of ``StitchTrainer`` (module docstring): a stage's key, its
    record, and taking a finished stage from a ``reuse`` run dir. They read the trainer's
    config, stages, stores, rows, device, stitch, history, stage results and ``reuse``."""

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
        stage, its stitch file's name and SHA-256, and the digest of all that (written after
        the stitch file, atomically)."""
        stage = self.stages[stage_index]
        result = {k: v for k, v in self.stage_results[stage].items() if k != "reused_from"}
        record = {
            "key": self.stage_key(stage_index),
            "result": result,
            "history": [row for row in self.history if row["stage"] == stage],
            "stitch_file": f"stitch-{stage}.safetensors",
            "stitch_sha256": hashlib.sha256(stitch_file).hexdigest(),
        }
        record["digest"] = record_digest(record)
        write_file(self.out / f"stage-{stage}.json", json.dumps(record, indent=1).encode())

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
        write_file(self.out / f"stitch-{stage}.safetensors", stitch_file)
        self.stitch.load_state_dict(load(stitch_file))
        self.history.extend(record["history"])
        self.stage_results[stage] = {**record["result"], "reused_from": str(run_dir)}
        self._write_stage_record(stage_index, stitch_file)
        if progress is not None:
            progress({"event": "stage_reused", "stage": stage, "stage_index": stage_index,
                      "stages": list(self.stages), "from": str(run_dir),
                      "val_loss": record["result"]["val_loss"]})  # fmt: skip
        return True


# options that only later stages or the test evaluation read, or that name the run itself
_NOT_IN_STAGE_KEY = (
    "out", "objective", "source_test", "target_test", "seg_decoder", "miou", "score_resolution",
    "device",  # its resolved type is in the key
)  # fmt: skip


_STAGE_RESULT = ("lr", "grid", "val_loss", "val_metric")  # the keys a stage record's result has


def read_stage_record(run_dir: Path, stage: str) -> tuple[dict, bytes]:
    """(stage record, stitch file bytes) of ``run_dir``'s ``stage-<stage>.json`` when the
    record parses and matches its digest and names its stitch file by the plain name
    ``stitch-<stage>.safetensors`` in ``run_dir`` (not a symlink) whose SHA-256 it records;
    else ``ValueError`` saying which (``OSError`` for a file that cannot be read). Both a
    stage taken from another run dir and the stitch a run's next stage starts from are read
    through it."""
    record = read_json(run_dir / f"stage-{stage}.json")
    if not isinstance(record, dict):
        raise ValueError(f"stage-{stage}.json holds a JSON {type(record).__name__}, not a record")
    if record.get("digest") != record_digest(record):
        raise ValueError(f"stage-{stage}.json does not match the digest it records (edited?)")
    name = f"stitch-{stage}.safetensors"
    path = run_dir_file(run_dir, record.get("stitch_file"), re.escape(name), name)
    stitch_file = path.read_bytes()
    got = hashlib.sha256(stitch_file).hexdigest()
    if got != record.get("stitch_sha256"):
        raise ValueError(
            f"{name} has SHA-256 {got}, stage-{stage}.json records {record.get('stitch_sha256')}"
        )
    return record, stitch_file


def _finished_stage(
    run_dir: Path, stage: str, key: dict, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict, bytes] | None:
    """(stage record, stitch file bytes) of ``run_dir``'s finished ``stage`` when its record
    parses and matches its digest, its key is ``key``, its result and history rows are well
    formed and its stitch file is ``stitch-<stage>.safetensors`` in ``run_dir`` with the
    recorded SHA-256 and the stitch's tensor ``shapes``; else None (absent, other, changed,
    damaged, elsewhere)."""
    try:
        record, stitch_file = read_stage_record(run_dir, stage)
    except (OSError, ValueError):
        return None
    if record.get("key") != key:
        return None
    result, history = record.get("result"), record.get("history")
    if not (isinstance(result, dict) and all(k in result for k in _STAGE_RESULT)):
        return None
    if not (isinstance(history, list) and history):
        return None
    if not all(isinstance(row, dict) and row.get("stage") == stage for row in history):
        return None
    if any(row.get("epoch") == 0 for row in history):  # from before epochs counted from 1
        return None
    try:
        tensors = load(stitch_file)
    except Exception:  # safetensors raises its own error types for a malformed file
        return None
    if {k: tuple(v.shape) for k, v in tensors.items()} != shapes:
        return None
    return record, stitch_file
