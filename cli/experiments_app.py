"""``stitchtrain`` experiment commands: sweep, report, cka, predictions, transfer.

Thin typer layer over ``stitchtrain.studies.sweep``, ``stitchtrain.studies.report``,
``stitchtrain.studies.cka`` and ``stitchtrain.studies.analysis``: parse, call the library, print.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import typer

from cli._console import console, err_console, reports_errors
from cli._parse import at_least, check_device, check_out_dir, check_scheduler, parse_lrs

CkaTokens = Literal["mean", "cls", "flatten"]  # stitchtrain.studies.cka.TOKEN_MODES

experiments_app = typer.Typer(
    help="Sweeps, reports and analyses of stitch runs.",
    no_args_is_help=True,
    add_completion=False,
)


def _point_plan(point, out) -> str:
    """A sweep point's FitPlan in one cell (``SweepPoint.fit_plan``), or why fit refuses it."""
    from featcache.errors import FeatcacheError

    try:
        plan = point.fit_plan(out)
    except FeatcacheError as error:
        return f"refused: {' '.join(str(error).split())}"
    if plan is None:
        return ""
    loaders = {loader["mode"] for loader in plan.loaders.values()}
    return (
        f"{plan.run_dir}; {'+'.join(plan.stages)}; rows {plan.train_rows}/{plan.val_rows}/"
        f"{plan.test_rows}; {'/'.join(sorted(loaders))}; max {plan.max_steps} steps"
    )


def _point_json(point, out) -> dict:
    """``sweep --dry-run --json``: a point with its FitPlan (``plan``, the object ``fit
    --dry-run --json`` prints; null for a probe point) or why fit refuses it (``refused``)."""
    from featcache.errors import FeatcacheError
    from stitchtrain.studies.sweep.run import completed_row

    entry = {"id": point.id, "kind": point.kind, "done": completed_row(point, out) is not None}
    try:
        plan = point.fit_plan(out)
    except FeatcacheError as error:
        return {**entry, "plan": None, "refused": " ".join(str(error).split())}
    return {**entry, "plan": None if plan is None else plan.to_dict(), "refused": None}


def _metric_text(row) -> str:
    """A result row's test metric named: ``test accuracy 0.7500 [0.5000, 0.9000] (n=12)``."""
    name = "test mIoU" if row.get("task") == "seg" else "test accuracy"
    metric = row.get("metric")
    if metric is None or metric != metric:  # None or NaN
        return f"{name} –"
    text = f"{name} {metric:.4f}"
    low, high, n = row.get("metric_low"), row.get("metric_high"), row.get("metric_n")
    if low is not None and low == low and high is not None:
        text += f" [{low:.4f}, {high:.4f}]"
    if n is not None and n == n:
        text += f" (n={int(n)})"
    return text


def _results_table(frame):
    """The sweep's results as a table: each point's status and its named test metric."""
    from rich.table import Table

    table = Table(title="sweep results")
    for column in ("point", "status", "result"):
        table.add_column(column)
    for row in frame.to_dict("records"):
        error = str(row.get("error") or "").splitlines()
        result = _metric_text(row) if row["status"] == "ok" else (error[0] if error else "")
        table.add_row(row["id"], row["status"], result)
    return table


@experiments_app.command()
@reports_errors
def sweep(
    config: Path = typer.Argument(..., help="Sweep config (.toml, .yaml or .yml)."),
    out: Path = typer.Option(..., help="Sweep dir: runs/, results.csv, results.parquet."),
    scheduler: str = typer.Option(
        "sequential", help="sequential | local | local:N | tcp://HOST:PORT (Dask scheduler)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the grid points and stop."),
    allow_geometry_mismatch: bool = typer.Option(
        False,
        "--allow-geometry-mismatch",
        help="Pair stores whose tokens see other pixels ([fit] allow_geometry_mismatch = true).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="With --dry-run: the points and their fit plans as JSON."
    ),
) -> None:
    """Run a grid of stitch runs plus baselines (linear probes, self-stitches); re-running
    skips finished points."""
    from rich.table import Table

    from cli._progress import FitProgress, progress_display
    from stitchtrain.studies.sweep.config import load_sweep_config
    from stitchtrain.studies.sweep.grid import plan_sweep
    from stitchtrain.studies.sweep.run import completed_row, run_sweep

    check_scheduler(scheduler, sequential=True)
    check_out_dir(out)
    loaded = load_sweep_config(config)
    if allow_geometry_mismatch:
        loaded["fit"] = {**(loaded.get("fit") or {}), "allow_geometry_mismatch": True}
    plan = plan_sweep(loaded, base=config.resolve().parent)
    if dry_run and as_json:
        print(json.dumps([_point_json(point, out) for point in plan.points], indent=2))
        return
    if dry_run:
        table = Table(title=f"{len(plan.points)} grid points")
        for column in ("id", "kind", "done", "fit plan"):
            table.add_column(column)
        for point in plan.points:
            done = completed_row(point, out) is not None
            table.add_row(point.id, point.kind, "yes" if done else "", _point_plan(point, out))
        console.print(table)
        return

    # points -> (in sequence) each point's fit: stages -> learning rates -> epochs
    with progress_display(console) as display:
        points = display.task("sweep point", len(plan.points), unit="point", echo=True)
        running: dict = {}  # the point in progress: its task and its fit's progress

        def started(point):
            running["task"] = display.task(point.id, None, parent=points)
            if point.kind != "probe":
                running["fit"] = FitProgress(display, parent=running["task"])
            return running.get("fit")

        def progress(row: dict, done: int, total: int) -> None:
            if "fit" in running:
                running.pop("fit").close()
            if "task" in running:
                running.pop("task").finish("")  # the point's line says how it went
            if row.get("skipped"):
                state = "done before"
            elif row["status"] == "ok":
                state = f"ok, {_metric_text(row)} ({row['seconds']:.1f} s)"
            else:
                state = f"failed: {str(row['error']).splitlines()[0]}"
            points.update(completed=done - 1)
            points.advance(note=f"{row['id']}: {state}", resumed=bool(row.get("skipped")))

        frame = run_sweep(plan, out, scheduler=None if scheduler == "sequential" else scheduler,
                          progress=progress, started=started)  # fmt: skip
    counts = frame.status.value_counts().to_dict()
    console.print(_results_table(frame))
    console.print(
        f"{len(frame)} points: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed; "
        f"table: {out / 'results.parquet'} and {out / 'results.csv'}",
        highlight=False,
    )
    if counts.get("failed"):
        raise typer.Exit(code=1)


@experiments_app.command()
@reports_errors
def report(
    dirs: list[Path] = typer.Argument(..., help="Sweep dirs (and dirs holding transfer outputs)."),
    out: Path = typer.Option(..., help="Report dir: index.html, report.md, PNG plots."),
    cka: bool = typer.Option(True, "--cka/--no-cka", help="CKA vs stitched metric per position."),
    cka_max_images: int | None = typer.Option(
        None, callback=at_least(2), help="Use only the first N train images (>= 2)."
    ),
    predictions: bool = typer.Option(
        True, "--predictions/--no-predictions", help="Table 12 prediction analysis."
    ),
    title: str = typer.Option("Model stitching report", help="Page title."),
) -> None:
    """Plots and tables of the paper's Figures 2-5 and Tables 1-4, 12 from sweep results."""
    from cli._progress import progress_display
    from stitchtrain.studies.report.page import build_report

    check_out_dir(out)
    with progress_display(console) as display:
        report_steps: dict = {"task": None, "step": ""}  # the task; the step in progress

        def progress(step: str, done: int, total: int) -> None:
            task = report_steps["task"] or display.task("report step", total, unit="step")
            report_steps["task"] = task
            if done > task.completed:  # the previous step finished
                task.advance(done - task.completed, note=f"{report_steps['step']} done")
            task.update(note="" if step == "done" else f"{step} ...")
            report_steps["step"] = step

        index = build_report(
            dirs,
            out,
            cka=cka,
            predictions=predictions,
            cka_max_images=cka_max_images,
            title=title,
            progress=progress,
        )
        if report_steps["task"] is not None:
            report_steps["task"].finish()
    console.print(f"report: {index} ({len(list(out.glob('*.png')))} plots)", highlight=False)


@experiments_app.command()
@reports_errors
def cka(
    store_a: str = typer.Argument(..., help="First store."),
    store_b: str = typer.Argument(..., help="Second store (same images, same rows)."),
    layers: str | None = typer.Option(None, help="Layers of A, e.g. 2,6,final (default: all)."),
    layers_b: str | None = typer.Option(None, help="Layers of B (default: --layers or all)."),
    tokens: CkaTokens = typer.Option("mean", help="How a layer becomes one vector per image."),
    minibatch: int | None = typer.Option(
        None, callback=at_least(4), help="Unbiased minibatch CKA with this batch (>= 4)."
    ),
    max_images: int | None = typer.Option(
        None, callback=at_least(2), help="Use only the first N valid images (>= 2)."
    ),
    out: Path = typer.Option(Path("cka"), help="Dir for cka.png, cka.json, cka.csv."),
    allow_geometry_mismatch: bool = typer.Option(
        False, "--allow-geometry-mismatch", help="Compare stores whose tokens see other pixels."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Linear CKA between layers of two stores (out of core), as a heatmap."""
    from dataclasses import asdict

    from rich.table import Table

    from cli._progress import progress_display
    from stitchtrain.studies.cka import cka_stores, parse_layers

    layers_a, layers_b = parse_layers(layers), parse_layers(layers_b)
    check_out_dir(out)
    with progress_display(err_console if as_json else console) as display:
        task = None  # the dask tasks that read and reduce the layers, k of N

        def progress(step: str, done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = display.task(step, total, unit="task", plain_every=2.0)
            task.update(total=total)
            task.advance(done - task.completed)

        result = cka_stores(
            store_a,
            store_b,
            layers_a,
            layers_b,
            tokens=tokens,
            minibatch=minibatch,
            max_images=max_images,
            allow_geometry_mismatch=allow_geometry_mismatch,
            progress=progress,
        )
        if task is not None:
            task.finish()
        with display.spinner(f"writing {out / 'cka.png'}, cka.json, cka.csv"):
            paths = result.save(out)
    if as_json:
        print(json.dumps(asdict(result), indent=2))
        return
    table = Table(title=f"{result.estimator} CKA: {result.encoder_a} (rows) vs {result.encoder_b}")
    table.add_column("layer")
    for layer in result.layers_b:
        table.add_column(layer, justify="right")
    for layer, values in zip(result.layers_a, result.values, strict=True):
        table.add_row(layer, *[f"{v:.3f}" for v in values])
    console.print(table)
    console.print(f"heatmap: {paths['png']}", highlight=False)


@experiments_app.command()
@reports_errors
def predictions(
    stitched_run: Path = typer.Argument(..., help="Run dir of the stitched model."),
    self_a: Path = typer.Argument(..., help="Run dir of the first self-stitch baseline."),
    self_b: Path = typer.Argument(..., help="Run dir of the second self-stitch baseline."),
    allow_geometry_mismatch: bool = typer.Option(
        False, "--allow-geometry-mismatch", help="Accept a run whose stores see other pixels."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Preserve / rescue / interference counts of a stitched run against its two self-stitch
    runs (paper Table 12); saves predictions.npy in each run dir."""
    from rich.table import Table

    from stitchtrain.studies.analysis import prediction_analysis

    result = prediction_analysis(
        stitched_run, self_a, self_b, allow_geometry_mismatch=allow_geometry_mismatch
    )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    names = [result["baseline_a"], result["baseline_b"], result["stitched"]]
    table = Table(title=f"Prediction analysis ({result['images']} test images)")
    table.add_column("model")
    for index, column in enumerate(result["columns"], start=1):
        table.add_column(f"{index} {column['scenario']}", justify="center")
    table.add_column("acc.", justify="right")
    accuracy = [result["accuracy"][k] for k in ("a", "b", "s")]
    for i, name in enumerate(names):
        table.add_row(name, *[c["pattern"][i] for c in result["columns"]], f"{accuracy[i]:.3f}")
    table.add_row("count", *[str(c["count"]) for c in result["columns"]], "")
    console.print(table)
    console.print(
        f"preserve {result['preserve']}, rescue {result['rescue']}, "
        f"interference {result['interference']}",
        highlight=False,
    )


@experiments_app.command()
@reports_errors
def transfer(
    run_dir: Path = typer.Argument(..., help="A run dir whose stitch was trained with FFM."),
    source: str = typer.Option(..., help="Source store (train split) of the other dataset."),
    target: str = typer.Option(..., help="Target store (train split) of the other dataset."),
    out: Path = typer.Option(..., help="Output dir: transfer.json, metrics.json."),
    source_test: str | None = typer.Option(None, help="Source test store (default: found)."),
    target_test: str | None = typer.Option(None, help="Target test store (default: found)."),
    lr: str | None = typer.Option(
        None, help="Probe learning rates, positive numbers (default: the run's)."
    ),
    epochs: int | None = typer.Option(
        None, callback=at_least(1), help="Probe epochs (default: the run's) (>= 1)."
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
) -> None:
    """Task-agnostic stitching (paper Table 4): a run's FFM stitch applied to another
    dataset's stores, scored by a linear probe on the stitched pooled outputs."""
    check_out_dir(out)
    check_device(device)
    from stitchtrain.studies.analysis import transfer_run  # torch: after the checks

    lrs = None if lr is None else parse_lrs(lr)
    metrics = transfer_run(
        run_dir,
        source,
        target,
        out,
        source_test=source_test,
        target_test=target_test,
        lrs=lrs,
        epochs=epochs,
        device=device,
    )
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    console.print(
        f"{metrics['source_encoder']} -> {metrics['target_encoder']} at {metrics['position']}, "
        f"stitch trained on {metrics['trained_on']}, applied to {metrics['dataset']}: "
        f"test accuracy {metrics['test_accuracy']:.4f} (linear probe, "
        f"{metrics['test_images']} images)",
        highlight=False,
    )
