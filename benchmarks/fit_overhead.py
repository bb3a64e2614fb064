"""Fit wall time against its optimiser steps: how much of a fit is the compute it exists for.

Issue goal: *summed time of a fit's forward / backward / optimiser steps ÷ wall time of the
fit ≥ 0.8 for tiny models at 100-1000 rows and ≥ 0.95 for a ViT-S-sized tail*, measured in the
same run. The steps are what the recipe times itself (``compute_s`` of every history row: the
loss forward, backward and AdamW step of each batch); the phases around them are timed here by
wrapping the recipe's methods, so the script measures any version of the recipe the same way:

    train steps   sum of the history's compute_s
    val forwards  sum of the history's val_compute_s: the validation loss forwards (0 for a
                  --baseline that does not record them: all of its validation is "val other")
    val other     the rest of StitchRecipe._validate (loader hand-over, metric bookkeeping)
    data wait     sum of the history's data_wait_s (the loader's batch hand-over)
    checkpoint    StitchRecipe._save_checkpoint (lr boundaries; epochs: --checkpoint-every)
    loop other    the rest of the stage loop (snapshots, the epoch bookkeeping)
    setup         StitchRecipe(config): stores opened and checked, encoders loaded
    evaluation    evaluate_run: test metrics after training

``ratio (compute)`` = (train steps + val forwards) ÷ wall time of the stage loop: the fit's
forward / backward / optimiser steps (validation forwards are forward steps of the protocol,
early stopping needs them every epoch) against the training loop's wall time; the goal's
ratio. ``ratio (loop)`` = train steps alone ÷ the same wall time: at ``--val-fraction`` v it
cannot exceed about 1 / (1 + v / (2 (1 - v))) (a validation row costs one forward, a training
row a forward and a backward), 0.947 at v = 0.1. ``ratio (fit)`` = train steps ÷ wall time of
the whole fit (setup and evaluation included).

Cases (each one fit, objective ffm+tlt, the ``--lrs`` grid, early stopping off so every case
runs its epochs): the tiny presets (dinov2-tiny -> siglip2-tiny at layer 2, 8x8 patches,
width 64) at ``--rows`` train images (default 100 and 1000; batch 128, so 1 and 8 steps per
epoch), and a ViT-S tail: random-init timm ``vit_small_patch16_224`` at ``--vit-s-size`` px
(default 224: 14x14 patches, 197 tokens, width 384, 12 blocks; the compute of a real ViT-S)
stitched to itself at layer 2, so the tail is 10 ViT-S blocks.

``--baseline DIR``: also run each case with the ``stitchtrain`` package found in DIR (an older
copy of the repository, e.g. ``git archive HEAD | tar -x -C /tmp/before``), in a subprocess,
and print both side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import run as run_cli

PHASES = ("train steps", "val forwards", "val other", "data wait", "checkpoint", "loop other")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100,1000", help="tiny-model train images per case")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per learning rate")
    parser.add_argument("--lrs", default="1e-3,5e-3", help="the learning-rate grid")
    parser.add_argument("--vit-s-rows", type=int, default=48, help="ViT-S case images (0: skip)")
    parser.add_argument("--vit-s-epochs", type=int, default=3)
    parser.add_argument(
        "--vit-s-size", type=int, default=224, help="ViT-S case input side in pixels (patch 16)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--baseline", default=None, help="repository copy to compare against")
    parser.add_argument("--work", default=None, help="where stores and run dirs go (temp dir)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # subprocess: one case
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser.parse_args(argv)


# -- stores ---------------------------------------------------------------------------------------
def make_stores(root: Path, case: dict) -> dict[str, str]:
    """Train and test stores of the case's models, made once per case under ``root``."""
    import featcache._compat  # noqa: F401
    from featcache.demo_data import make_demo_dataset
    from featcache.encoders import load_encoder
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction

    done = root / "stores.json"
    if done.is_file():
        return json.loads(done.read_text())
    # train images = (1 - test_fraction) x 3 classes x per_class
    per_class = -(-case["rows"] * 5 // (4 * 3))
    size = case.get("size", 64)
    manifest = make_demo_dataset(root / "data", num_classes=3, per_class=per_class, size=size,
                                 test_fraction=0.2, seed=0)  # fmt: skip
    if case["kind"] == "vit-s":
        encoders = [load_encoder(case["model"], random_init=True, img_size=size)]
    else:
        encoders = None
    urls = {}
    for split in ("train", "test"):
        config = ExtractConfig(
            models=[case["source"], case["target"]] if encoders is None else [case["model"]],
            data=str(manifest),
            out=str(root / "stores"),
            layers=[2],
            split=split,
            shard_size=128,
            device="cpu",
        )
        plan = plan_extraction(config, encoders=encoders)
        run_extraction(plan)
        urls[f"source-{split}"] = plan.urls[0]
        urls[f"target-{split}"] = plan.urls[-1]
    done.write_text(json.dumps(urls))
    return urls


# -- one timed fit --------------------------------------------------------------------------------
def timed_fit(case: dict, work: Path) -> dict:
    """Fit the case once with the ``stitchtrain`` importable here; the phase times."""
    import featcache._compat  # noqa: F401
    import stitchtrain.pipeline.fit as fit_module  # where StitchRecipe.run looks up evaluate_run
    from stitchtrain.pipeline.fit import StitchRecipe
    from stitchtrain.train.config import FitConfig

    urls = make_stores(work / case["name"], case)
    out = work / case["name"] / f"run-{os.getpid()}-{time.time_ns()}"
    config = FitConfig(
        source=urls["source-train"],
        target=urls["target-train"],
        source_test=urls["source-test"],
        target_test=urls["target-test"],
        position=2,
        out=str(out),
        stitch="mlp" if case["kind"] == "tiny" else "linear",
        objective="ffm+tlt",
        lrs=tuple(case["lrs"]),
        epochs=case["epochs"],
        patience=case["epochs"],  # no early stop: every case runs all its epochs
        batch_size=128,
        device="cpu",
        random_init=case["kind"] == "vit-s",
    )
    spent = {"validation": 0.0, "checkpoint": 0.0, "evaluation": 0.0}

    class Timed(StitchRecipe):
        def _validate(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._validate(*args, **kwargs)
            finally:
                spent["validation"] += time.perf_counter() - start

        def _save_checkpoint(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._save_checkpoint(*args, **kwargs)
            finally:
                spent["checkpoint"] += time.perf_counter() - start

    evaluate_run = fit_module.evaluate_run

    def timed_evaluate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return evaluate_run(*args, **kwargs)
        finally:
            spent["evaluation"] += time.perf_counter() - start

    fit_module.evaluate_run = timed_evaluate
    try:
        start = time.perf_counter()
        recipe = Timed(config)
        setup = time.perf_counter() - start
        recipe.run()
        total = time.perf_counter() - start
    finally:
        fit_module.evaluate_run = evaluate_run
    history = recipe.history
    steps = sum(row["compute_s"] for row in history)
    val_forwards = sum(row.get("val_compute_s", 0.0) for row in history)
    wait = sum(row["data_wait_s"] for row in history)
    loop = total - setup - spent["evaluation"]
    phases = {
        "train steps": steps,
        "val forwards": val_forwards,
        "val other": spent["validation"] - val_forwards,
        "data wait": wait,
        "checkpoint": spent["checkpoint"],
    }
    phases["loop other"] = loop - sum(phases.values())
    return {
        "case": case["name"],
        "epochs_run": len(history),
        "optimiser_steps": sum(-(-len(recipe.train_rows) // 128) for _ in history),
        "train_rows": len(recipe.train_rows),
        "phases": phases,
        "setup": setup,
        "evaluation": spent["evaluation"],
        "loop_s": loop,
        "fit_s": total,
        "ratio_compute": (steps + val_forwards) / loop,
        "ratio_loop": steps / loop,
        "ratio_fit": steps / total,
    }


def cases(args) -> list[dict]:
    lrs = [float(lr) for lr in args.lrs.split(",")]
    tiny = dict(kind="tiny", epochs=args.epochs, lrs=lrs, source="dinov2-tiny")
    found = [
        dict(name=f"tiny-{rows}", rows=rows, target="siglip2-tiny", **tiny)
        for rows in (int(r) for r in args.rows.split(",") if r)
    ]
    if args.vit_s_rows:
        vit_s = dict(kind="vit-s", epochs=args.vit_s_epochs, lrs=lrs, size=args.vit_s_size)
        model = "timm:vit_small_patch16_224"
        name = f"vit-s-{args.vit_s_rows}-{args.vit_s_size}px"
        found.append(dict(name=name, rows=args.vit_s_rows, model=model, **vit_s))
    return found


def _subprocess(case: dict, work: Path, repo: str | None, threads: int) -> dict:
    """One case in a fresh interpreter (``repo``: import stitchtrain / featcache from there)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if repo:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(repo).resolve()), env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--case", json.dumps(case), "--work", str(work)]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {case['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    if args.case:  # the subprocess side: one case, one JSON line
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(timed_fit(json.loads(args.case), Path(args.work))))
        sys.exit(0)
    work = Path(args.work or tempfile.mkdtemp(prefix="fit-overhead-"))
    result = {"load_before": os.getloadavg(), "cases": []}
    for case in cases(args):
        entry = {"name": case["name"]}
        if args.baseline:
            entry["baseline"] = _subprocess(case, work, args.baseline, args.threads)
        entry["current"] = _subprocess(case, work, None, args.threads)
        result["cases"].append(entry)
    result["load_after"] = os.getloadavg()
    return result


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for entry in result["cases"]:
        versions = [v for v in ("baseline", "current") if v in entry]
        first = entry[versions[0]]
        table = Table(
            title=f"{entry['name']}: {first['train_rows']} train rows, {first['epochs_run']} "
            f"epochs, {first['optimiser_steps']} optimiser steps"
        )
        table.add_column("phase")
        for version in versions:
            table.add_column(f"{version} s", justify="right")
            table.add_column("share", justify="right")
        for phase in PHASES:
            cells = []
            for version in versions:
                got = entry[version]
                cells += [
                    f"{got['phases'][phase]:.3f}",
                    f"{got['phases'][phase] / got['loop_s']:.1%}",
                ]
            table.add_row(phase, *cells)
        for name, key in (("stage loop", "loop_s"), ("setup", "setup"),
                          ("evaluation", "evaluation"), ("whole fit", "fit_s")):  # fmt: skip
            table.add_row(name, *[c for v in versions for c in (f"{entry[v][key]:.3f}", "")])
        for name, key in (("ratio (compute)", "ratio_compute"), ("ratio (loop)", "ratio_loop"),
                          ("ratio (fit)", "ratio_fit")):  # fmt: skip
            table.add_row(name, *[c for v in versions for c in (f"{entry[v][key]:.3f}", "")])
        console.print(table)
    console.print(f"load average before {result['load_before']}, after {result['load_after']}")


if __name__ == "__main__":
    run_cli(parse_args, measure, print_tables)
