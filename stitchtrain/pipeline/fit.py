"""``stitchtrain fit``: one readable training recipe for a stitch layer (paper sections 3-5), the
composition of training (``stitchtrain.train``) and evaluation (``stitchtrain.evaluate``).

    setup     ``StitchTrainer``: open and check the stores, pair them, split train rows into
              train / validation, load the frozen target encoder and check its fingerprint;
              then find and check the test stores (``evaluation.evaluation_split``)
    stages    the objective's stages in order (``StitchTrainer.train``)
    evaluate  test-split accuracy / mIoU and the Figure 2 feature distances
              (``stitchtrain.evaluate.evaluation``); none for LFM / FFM on unlabelled
              stores (a task-agnostic stitch, e.g. on a LLaVA-style corpus: its hybrid is
              what gets probed)
    save      config.json, stitch.safetensors, head.safetensors, history.csv, metrics.json,
              and per LFM / FFM stage stitch-<stage>.safetensors + stage-<stage>.json

Resume guarantee: the same command on the same run dir continues from the last checkpoint
(replaying the epochs run since, at most ``checkpoint_every`` seconds of work) and ends with
the run an uninterrupted one writes, bitwise (stitch.safetensors, head.safetensors,
history.csv apart from its timing columns, metrics.json), wherever it was killed: inside a
learning rate, at a learning-rate or stage boundary, or during evaluation. Every random choice
is seeded from (seed, stage, learning rate, epoch) or restored from the checkpoint. A run dir
whose metrics.json exists is finished: ``fit`` returns those metrics at once, without opening
the stores, loading an encoder or training. A run dir made with a different config is refused.

Ctrl-C (SIGINT) or SIGTERM: during training the epoch in progress finishes and is checkpointed
(``stitchtrain.train``); during setup and the test evaluation, which have no safe point to wait
for, the fit stops at once (``featcache.interrupts.stop_at_once_on_signal``) with one line
saying what is kept: the run dir's last checkpoint, if any, or that nothing was trained yet;
during evaluation, that training is complete and checkpointed, so the same command re-runs
only the evaluation (its checkpoint is past the last learning rate of the last stage).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featcache.errors import Interrupted
from featcache.interrupts import stop_at_once_on_signal, stop_requested
from stitchtrain.evaluate.evaluation import evaluate_run, evaluation_split
from stitchtrain.train.checkpoint import (
    CHECKPOINT_EVERY_S,
    checkpoint_interval,
    checkpoint_position,
)
from stitchtrain.train.config import FitConfig, FitStopped
from stitchtrain.train.rundir import check_run_dir, finished_metrics, remove_checkpoint, write_file
from stitchtrain.train.trainer import StitchTrainer

__all__ = ["UNSCORED", "StitchRecipe", "fit"]

_log = logging.getLogger(__name__)

UNSCORED = "none: unlabelled train stores (no test score)"  # metrics.json's evaluation


class StitchRecipe(StitchTrainer):
    """Setup, the stage loop, evaluation and saving for one ``FitConfig``: the
    ``StitchTrainer`` with ``run``, which composes its training with the test evaluation."""

    @property
    def scored(self) -> bool:
        """Whether the run has a test score. Not for a task-agnostic stitch: LFM / FFM stages
        only, the classification task, unlabelled target train stores (no classes: a
        LLaVA-style corpus); its use is a hybrid (stitchtrain.hybrid), probed elsewhere. Such a
        run neither looks for test stores nor evaluates, in ``fit`` and ``fit --dry-run``."""
        labelled = bool(self.target.attrs["dataset"].get("classes"))
        return labelled or "tlt" in self.stages or self.config.task != "cls"

    def run(self, progress=None, log=None) -> dict[str, Any]:
        """Train every stage (resuming from the checkpoint if there is one), evaluate, save;
        return the metrics (a finished run dir: its metrics.json, at once). ``progress`` gets
        event dicts: "lr_start", "epoch" (a history row), "lr_done", "evaluate" (the keys:
        cli._progress.FitProgress). ``log`` gets one
        line per incomplete store used (``allow_incomplete``); default: warnings of this
        module's logger."""
        finished = finished_metrics(self.out, self.config)
        if finished is not None:
            return finished
        trained = False
        with stop_at_once_on_signal():  # the training loop defers a signal to its epoch's end
            try:
                # test stores are refused here, before any training step
                split = evaluation_split(self) if self.scored else None
                incomplete = {**self.incomplete, **(split.incomplete if split else {})}
                for url, note in incomplete.items():
                    (log or _log.warning)(
                        f"{url}: {len(note['unmarked_shards'])} of {note['num_shards']} shards "
                        f"have no completion marker; using the marked shards only, "
                        f"{note['rows_used']} of {note['num_rows']} rows."
                    )
                self.train(progress)
                trained = True
                if stop_requested():  # arrived after the last epoch: stop before evaluating
                    raise Interrupted("", stop_requested())
                if progress is not None:
                    progress({"event": "evaluate"})
                if split is not None:
                    metrics = evaluate_run(self.out, recipe=self, split=split)
                else:
                    metrics = {"evaluation": UNSCORED}
            except FitStopped:
                raise
            except Interrupted as err:
                if trained:
                    raise _stopped(err, "during the test evaluation", (
                        f"training is complete and checkpointed in {self.out}; the same command "
                        "re-runs only the evaluation."
                    )) from None  # fmt: skip
                raise _stopped_in_setup(err, self.config) from None
        final_stage = self.stages[-1]
        metrics["train_rows"], metrics["val_rows"] = len(self.train_rows), len(self.val_rows)
        if incomplete:
            metrics["incomplete_stores"] = incomplete
        metrics["stages"] = self.stage_results
        metrics["final_stage"] = final_stage
        metrics["protocol"] = self.protocol()
        metrics["stitch_sha256"] = {  # what a hybrid of this run checks (stitchtrain.hybrid)
            stage: hashlib.sha256(
                self.out.joinpath(f"stitch-{stage}.safetensors").read_bytes()
            ).hexdigest()
            for stage in self.stages
        }
        write_file(self.out / "metrics.json", json.dumps(metrics, indent=2).encode())
        remove_checkpoint(self.out)
        return metrics


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
    finished = finished_metrics(Path(config.out), config)
    if finished is not None:
        return finished
    check_run_dir(Path(config.out), config)  # before opening a store or loading an encoder
    with stop_at_once_on_signal():
        try:
            recipe = StitchRecipe(config, checkpoint_every, reuse)
        except Interrupted as err:
            raise _stopped_in_setup(err, config) from None
    return recipe.run(progress, log)


def _stopped(err: Interrupted, when: str, kept: str) -> FitStopped:
    """The one-line ``FitStopped`` of a signal outside the training loop."""
    how = f"at once by a second {err.signal_name}" if err.at_once else f"by {err.signal_name}"
    return FitStopped(f"Stopped {how} {when}: {kept}", err.signal_name, at_once=err.at_once)


def _stopped_in_setup(err: Interrupted, config: FitConfig) -> FitStopped:
    """A signal while the stores open, the encoder loads or the checkpoint is read: what the
    run dir keeps (its checkpoint, if any)."""
    when = "while setting up the fit (stores, encoder)"
    kept = checkpoint_position(Path(config.out), config.objective.split("+"), config.lrs)
    if kept is None:
        return _stopped(err, when, "nothing was trained yet; the same command starts the run.")
    return _stopped(
        err, when, f"{config.out} keeps the checkpoint {kept}; the same command resumes from there."
    )
