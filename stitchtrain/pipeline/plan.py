"""``stitchtrain fit --dry-run``: what a fit would do, after every check fit makes, no training.

``plan_fit(config)`` runs fit's setup (``StitchRecipe``: stores opened and checked, pairing,
geometry, position, encoder fingerprints; the test stores found and checked, unless the run
has no test score, ``StitchRecipe.scored``, as fit; the run dir's state) and builds the
loaders training and evaluation would use, which decide staged or streamed from the memory
budget without reading any data. Nothing is written.

Memory of a training step (``step_memory``, bytes, float32, per stage at its batch size B):

    activations  the autograd graph of the stitch and the frozen target tail, forward to
                 backward. A timm pre-norm ``Block`` (x + attn(norm1(x)), then
                 x + mlp(norm2(x))) with frozen weights keeps, per token of width D, for the
                 input gradient only (no weight gradients in the tail): norm1's input (1),
                 the fused qkv output that the attention saves (3), the attention output (1),
                 norm2's input (1) and the GELU's input (4): ``BLOCK_SAVED`` = 10 floats, plus
                 per-token LayerNorm and attention statistics (2 + 2 + heads, dropped: under
                 1% at D >= 64). The frozen linears keep nothing: their input gradient needs
                 only the weight. On top of the saved graph, a block's backward holds its
                 working set, the 4D hidden and its gradient: ``BLOCK_WORKING`` = 8. So
                     tail = 4 B T D (BLOCK_SAVED * blocks + BLOCK_WORKING + 3)
                 with blocks = N - n, T tokens, and 3 for the final norm's input and the FFM
                 loss's two operands. The stitch adds 4 B (Ts Ds + Ts H) for an MLP (its first
                 linear's input, the ReLU output that the second linear also reads; H the
                 hidden width), 4 B Ts Ds for a linear stitch, a source block's 4 B Ts Ds
                 (BLOCK_SAVED + BLOCK_WORKING) for LoRA. LFM runs no tail: stitch + 2 operands.
    optimiser    AdamW's exp_avg and exp_avg_sq and the gradient of every trainable parameter:
                 3 x 4 bytes x trainable parameters (the parameters: ``model_bytes``).

``peak_bytes`` = staged loaders + model parameters + the largest stage's activations and
optimiser state. Checked against measured peaks in tests/test_fail_fast.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stitchtrain.data.loader import FeatureLoader, Field, _default_budget, parse_size
from stitchtrain.data.pairing import source_array
from stitchtrain.data.sizes import format_size
from stitchtrain.evaluate.evaluation import evaluation_split
from stitchtrain.pipeline.fit import UNSCORED, StitchRecipe
from stitchtrain.train.config import FitConfig
from stitchtrain.train.rundir import check_run_dir

__all__ = ["FitPlan", "plan_fit", "step_memory", "tail_activation_bytes"]

BLOCK_SAVED = 10  # floats per token and channel a frozen timm Block saves for backward
BLOCK_WORKING = 8  # a block's backward working set on top: the 4D hidden and its gradient


@dataclass
class FitPlan:
    """The plan of one fit (JSON-able through ``to_dict``)."""

    out: str
    run_dir: str  # fresh | started | resumable | finished (rundir.check_run_dir)
    device: str
    stages: list[str]
    lrs: list[float]
    epochs: int
    patience: int
    batch_size: dict[str, int]  # per stage
    train_rows: int
    val_rows: int
    test_rows: int
    memory_budget: int  # bytes, per loader (the given --memory-budget or the default)
    # "<stage>/train", "<stage>/val", "test": {"mode": staged|streamed, "rows", "bytes"}
    loaders: dict[str, dict[str, Any]] = field(default_factory=dict)
    staged_bytes: int = 0  # held in memory by the staged loaders together
    model_bytes: int = 0  # stitch, head and the frozen encoders' parameters
    steps_per_epoch: dict[str, int] = field(default_factory=dict)
    # per stage at its batch size (module docstring): the step's autograd graph and working
    # set, and AdamW's state plus gradients of the trainable parameters
    activation_bytes: dict[str, int] = field(default_factory=dict)
    optimiser_bytes: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0  # staged + model + the largest stage's activations and optimiser
    # at most (early stopping may end sooner): epochs x steps per epoch x lrs, over the stages;
    # 0 for a finished run dir (fit returns its metrics at once)
    max_steps: int = 0
    incomplete_stores: list[str] = field(default_factory=list)
    # stage -> the run dir it would be taken from, not trained (fit's shared stages, --reuse);
    # those stages' steps are not in max_steps
    reused: dict[str, str] = field(default_factory=dict)
    # "test split", or fit's UNSCORED for a task-agnostic stitch (no test stores looked for)
    evaluation: str = "test split"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(name, value) lines for a table."""
        lines = [
            ("run dir", f"{self.out} ({self.run_dir})"),
            ("device", self.device),
            ("stages", " -> ".join(self.stages)),
            ("lr grid", ", ".join(f"{lr:g}" for lr in self.lrs)),
            ("epochs / patience", f"{self.epochs} / {self.patience}"),
            ("batch size", ", ".join(f"{s} {b}" for s, b in self.batch_size.items())),
            ("rows train / val / test", f"{self.train_rows} / {self.val_rows} / {self.test_rows}"),
            ("evaluation", self.evaluation),
            ("memory budget", format_size(self.memory_budget)),
        ]
        for name, loader in self.loaders.items():
            lines.append(
                (
                    f"loader {name}",
                    f"{loader['mode']}, {loader['rows']} rows, {format_size(loader['bytes'])}",
                )
            )
        lines += [
            ("staged memory", format_size(self.staged_bytes)),
            ("model parameters", format_size(self.model_bytes)),
            (
                "step activations",
                ", ".join(f"{s} {format_size(n)}" for s, n in self.activation_bytes.items()),
            ),
            (
                "optimiser state",
                ", ".join(f"{s} {format_size(n)}" for s, n in self.optimiser_bytes.items()),
            ),
            ("estimated peak memory", format_size(self.peak_bytes)),
            ("steps per epoch", ", ".join(f"{s} {n}" for s, n in self.steps_per_epoch.items())),
            ("max optimiser steps", str(self.max_steps)),
        ]
        if self.incomplete_stores:
            lines.append(("incomplete stores", ", ".join(self.incomplete_stores)))
        for stage, run_dir in self.reused.items():
            lines.append((f"{stage} stage", f"taken from {run_dir}, not trained"))
        return lines


def _loader_entry(loader: FeatureLoader) -> dict[str, Any]:
    return {
        "mode": "staged" if loader.staged else "streamed",
        "rows": len(loader.rows),
        "bytes": int(loader.nbytes),
    }


def _parameter_bytes(*modules) -> int:
    return sum(
        p.numel() * p.element_size()
        for module in modules
        if module is not None
        for p in module.parameters()
    )


def tail_activation_bytes(batch: int, tokens: int, width: int, blocks: int) -> int:
    """Float32 bytes a forward + backward of ``blocks`` frozen timm ViT blocks holds at its
    peak: 4 B T D (BLOCK_SAVED * blocks + BLOCK_WORKING) (module docstring)."""
    if blocks <= 0:
        return 0
    return 4 * batch * tokens * width * (BLOCK_SAVED * blocks + BLOCK_WORKING)


def _tokens(encoder: dict) -> int:
    layout = encoder["layout"]
    return len(layout["prefix"]) + math.prod(layout["grid"])


def step_memory(recipe: StitchRecipe, stage: str) -> tuple[int, int]:
    """(activation bytes, optimiser bytes) of one training step of ``stage`` (module
    docstring), from the stores' encoder records and the recipe's stitch and head."""
    config = recipe.config
    batch = config.stage_batch_size(stage)
    source, target = recipe.source.attrs["encoder"], recipe.target.attrs["encoder"]
    ts, ds = _tokens(source), source["width"]
    tt, dt = _tokens(target), target["width"]
    if config.stitch == "mlp":
        hidden = config.mlp_hidden or dt
        stitch = 4 * batch * ts * (ds + hidden)
    elif config.stitch == "lora":
        stitch = 4 * batch * ts * ds * (BLOCK_SAVED + BLOCK_WORKING)
    else:
        stitch = 4 * batch * ts * ds
    if stage == "lfm":
        activations = stitch + 4 * batch * tt * dt * 2
    else:
        blocks = target["depth"] - config.position
        activations = stitch + tail_activation_bytes(batch, tt, dt, blocks)
        activations += 4 * batch * tt * dt * 3  # final norm input, the loss's two operands
    trainable = sum(p.numel() for p in recipe._trainable(stage))
    return int(activations), 3 * 4 * trainable


def plan_fit(config: FitConfig, reuse: Sequence[str | Path] = ()) -> FitPlan:
    """Check every input of ``fit(config, reuse=reuse)`` as fit does before its first step
    and return its plan; raises fit's errors. Writes nothing (the run dir is not created)."""
    state = check_run_dir(Path(config.out), config)
    recipe = StitchRecipe(config, reuse=reuse)
    reused = {}
    for index, stage in enumerate(recipe.stages):
        found = recipe.reusable_stage(index)
        if found is not None:
            reused[stage] = str(found[0])
    split = evaluation_split(recipe) if recipe.scored else None  # as fit: none unscored
    loaders = {}
    for stage in recipe.stages:
        for part in ("train", "val"):
            loaders[f"{stage}/{part}"] = recipe._stage_loader(stage, part)
    labels = "labels" if config.task == "cls" else "masks"
    source_name = source_array(config.stitch, config.position)
    if split is not None:
        loaders["test"] = recipe._loader(
            [Field("source", split.source, source_name), Field("labels", split.target, labels)],
            split.rows,
            128,
            shuffle=False,
        )
    entries = {name: _loader_entry(loader) for name, loader in loaders.items()}
    steps = {
        stage: math.ceil(len(recipe.train_rows) / config.stage_batch_size(stage))
        for stage in recipe.stages
    }
    budget = (
        parse_size(config.memory_budget)
        if config.memory_budget is not None
        else _default_budget(recipe.device)
    )
    encoders = [getattr(e, "module", None) for e in (recipe.target_encoder, recipe.source_encoder)]
    trained = [stage for stage in recipe.stages if stage not in reused]
    max_steps = sum(config.epochs * steps[stage] * len(config.lrs) for stage in trained)
    memory = {stage: step_memory(recipe, stage) for stage in recipe.stages}
    staged_bytes = sum(e["bytes"] for e in entries.values() if e["mode"] == "staged")
    model_bytes = _parameter_bytes(recipe.stitch, recipe.head, *encoders)
    return FitPlan(
        out=str(config.out),
        run_dir=state,
        device=str(recipe.device),
        stages=list(recipe.stages),
        lrs=list(config.lrs),
        epochs=config.epochs,
        patience=config.patience,
        batch_size={stage: config.stage_batch_size(stage) for stage in recipe.stages},
        train_rows=len(recipe.train_rows),
        val_rows=len(recipe.val_rows),
        test_rows=len(split.rows) if split is not None else 0,
        memory_budget=int(budget),
        loaders=entries,
        staged_bytes=staged_bytes,
        model_bytes=model_bytes,
        steps_per_epoch=steps,
        activation_bytes={stage: m[0] for stage, m in memory.items()},
        optimiser_bytes={stage: m[1] for stage, m in memory.items()},
        peak_bytes=staged_bytes + model_bytes + max(sum(m) for m in memory.values()),
        max_steps=0 if state == "finished" else max_steps,
        incomplete_stores=sorted({**recipe.incomplete, **(split.incomplete if split else {})}),
        reused=reused,
        evaluation="test split" if split is not None else UNSCORED,
    )
