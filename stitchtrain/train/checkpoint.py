"""Checkpoint and resume: the training state of a fit in progress, written to its run dir and read
back (``Checkpoints``, a part of ``StitchTrainer``), the epoch-checkpoint interval, the stop on
SIGINT (Ctrl-C) / SIGTERM at an epoch's end, and the tensor copies and (de)serialisation it uses.

Checkpoints: after an epoch once ``checkpoint_every`` seconds (default ``CHECKPOINT_EVERY_S``;
0: every epoch) have passed since the last one, always when a learning rate finishes, and after
a SIGINT or SIGTERM at the end of the epoch in progress (then the fit stops: ``FitStopped``, exit
status 130 or 143; a second signal stops it at once, keeping the last checkpoint), the training
state is written to the run dir as two files:
    checkpoint-<sha256[:16]>.safetensors   every tensor: the stitch, head and AdamW state of the
                                           learning rate in progress (after an epoch only), the
                                           best snapshots (current: this lr; overall: the
                                           finished lrs), the torch RNG state(s)
    checkpoint.json                        the rest: stage index, early-stopping and schedule
                                           state (optimiser steps taken at the lr), finished
                                           learning rates, stage results, history, the non-tensor
                                           snapshot fields, the config it was written under,
                                           the tensors file's name and hash, and ``digest``
                                           (``rundir.record_digest``: SHA-256 of all the rest)
Each file is written to a temp file and renamed into place, tensors first: a kill between the
two leaves the previous checkpoint.json naming the previous tensors file, which is still there
(older tensors files are deleted only after the new JSON is in place); a tensors file whose
SHA-256 is not the one the JSON names is refused. The checkpoint files are removed once
metrics.json is written, by their exact names (``rundir.remove_checkpoint``).

Resume trusts nothing it did not write (``rundir.read_checkpoint``, which ``fit --dry-run``
runs too before it calls a run dir resumable): checkpoint.json must parse (JSON nested too
deeply is malformed too), carry the digest of its own content, have been written under the
config of this run (a config.json edited after the kill and a command matching the edit are
refused, naming the fields), and name its tensors file by a plain name of the pattern
``checkpoint-<16 hex>.safetensors`` inside the run dir (no path, no symlink), whose SHA-256 it
records. Every refusal is one line saying what to remove to restart; nothing is deleted or
rewritten by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, save
from torch import nn

from featcache.errors import FeatcacheError
from featcache.interrupts import stop_on_signal
from stitchtrain.train.config import FitStopped
from stitchtrain.train.rundir import (
    CHECKPOINT,
    CHECKPOINT_TENSORS,
    read_checkpoint,
    record_digest,
    write_file,
)

if TYPE_CHECKING:
    from stitchtrain.train.stages import _StageState

__all__ = [
    "CHECKPOINT_EVERY_S",
    "Checkpoints",
    "checkpoint_interval",
    "checkpoint_position",
    "describe_position",
    "resume_message",
]

# An epoch checkpoint costs 15-20 ms (a few MB hashed, written, fsynced): on a GPU, where an
# epoch of a small stitch can take less, one per epoch would be most of the fit.
CHECKPOINT_EVERY_S = 60.0


def checkpoint_interval(seconds: Any) -> float:
    """``seconds`` as the epoch-checkpoint interval (a number >= 0; inf: lr boundaries only)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise FeatcacheError(f"Expected --checkpoint-every >= 0 seconds. Got {seconds!r} instead.")
    return float(seconds)


def describe_position(stages: list[str], lrs: tuple[float, ...], record: dict) -> str:
    """Where a checkpoint record stands, in words: "after epoch 3 of stage ffm, lr 0.005",
    "at the start of lr 0.01 (2/3) of stage ffm" or "after the last lr of stage ffm"."""
    stage, state = stages[record["stage_index"]], record["state"]
    if state["lr_index"] >= len(lrs):
        return f"after the last lr of stage {stage}"
    lr = lrs[state["lr_index"]]
    if state["epoch"] == 0:
        return f"at the start of lr {lr:g} ({state['lr_index'] + 1}/{len(lrs)}) of stage {stage}"
    return f"after epoch {state['epoch']} of stage {stage}, lr {lr:g}"


def checkpoint_position(out: Path, stages: list[str], lrs: tuple[float, ...]) -> str | None:
    """Where the checkpoint in run dir ``out`` is ("after epoch 3 of stage ffm, lr 0.005"),
    or None when it has none (or none that can be read)."""
    try:
        record = json.loads((Path(out) / CHECKPOINT).read_text())
        return describe_position(stages, lrs, record)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def resume_message(stages: list[str], config: Any, record: dict, out: Any) -> str:
    """The line a resumed fit prints (epochs counted from 1): "resuming from epoch 4 of stage
    ffm (lr 0.005, 1/3): the checkpoint in OUT", or "resuming after the last epoch of ..."
    when the learning rate in progress has run all its epochs (or stopped early)."""
    stage, state, lrs = stages[record["stage_index"]], record["state"], config.lrs
    if state["lr_index"] >= len(lrs):
        where = f"at the end of stage {stage} (every lr done)"
    else:
        lr, k = lrs[state["lr_index"]], state["lr_index"] + 1
        done = state["epoch"] >= config.epochs or state["stale"] >= config.patience
        epoch = "after the last epoch" if done else f"from epoch {state['epoch'] + 1}"
        where = f"{epoch} of stage {stage} (lr {lr:g}, {k}/{len(lrs)})"
    return f"resuming {where}: the checkpoint in {out}"


class Checkpoints:
    """The checkpoint methods of ``StitchTrainer`` (module docstring). They read the trainer's
    ``out``, ``device``, ``config``, ``stages``, ``stitch``, ``head``, ``stage_results`` and
    ``history``, and keep its epoch-checkpoint clock (``_last_checkpoint``)."""

    _last_checkpoint: float

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
        write_file(self.out / name, payload)
        record["tensors"] = {"file": name, "sha256": digest}
        record["config"] = asdict(self.config)
        record["digest"] = record_digest(record)
        write_file(self.out / CHECKPOINT, json.dumps(record).encode())
        for old in self.out.iterdir():
            if re.fullmatch(CHECKPOINT_TENSORS, old.name) and old.name != name:
                old.unlink()
        self._last_checkpoint = time.monotonic()

    def _load_checkpoint(self) -> dict | None:
        """The checkpoint's record with its tensors in place, or None when there is none."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return None
        record, payload = read_checkpoint(self.out, self.config)
        resume = _join_tensors(record, load(payload))
        if resume["training"] is not None:  # JSON keys are strings; AdamW's are parameter ids
            state = resume["training"]["optimizer"]
            resume["training"]["optimizer"] = {int(k): v for k, v in state.items()}
        return resume

    @contextlib.contextmanager
    def _stop_at_epoch_end_on_signal(self):
        """While training: a SIGINT (Ctrl-C) or SIGTERM (a batch scheduler preempting the job)
        lets the epoch in progress finish, then the stage loop checkpoints and raises
        ``FitStopped``; a second signal stops at once, keeping the last checkpoint
        (``featcache.interrupts``: main thread only, a Dask worker's fit keeps the default)."""
        with stop_on_signal("stopping after the epoch in progress, which is checkpointed"):
            yield

    def _stopped_at_once(self, signal_name: str) -> FitStopped:
        """The ``FitStopped`` of a second signal: what the run dir keeps, read from it."""
        kept = self._checkpoint_position()
        if kept is None:
            return FitStopped(
                f"Stopped at once by a second {signal_name}: no checkpoint had been written yet "
                f"in {self.out} (one is written after --checkpoint-every seconds and when a "
                "learning rate ends), so the same command starts the run over.",
                signal_name,
                at_once=True,
            )
        return FitStopped(
            f"Stopped at once by a second {signal_name}: {self.out} keeps the checkpoint "
            f"{kept}; the same command resumes from there.",
            signal_name,
            at_once=True,
        )

    def _checkpoint_position(self) -> str | None:
        """Where the run dir's checkpoint is (``checkpoint_position``)."""
        return checkpoint_position(self.out, self.stages, self.config.lrs)

    def _restore_rng(self, resume: dict) -> None:
        torch.set_rng_state(resume["rng"]["torch"])
        if "cuda" in resume["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(resume["rng"]["cuda"], self.device)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


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
