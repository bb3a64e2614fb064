"""``stitchtrain``: plan and (in later releases) fit stitch layers between two encoders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer

if TYPE_CHECKING:
    from rich.table import Table

from cli._console import RICH_MARKUP_MODE, console, err_console, reports_errors, version_option
from cli._fit_notes import interval_rows, selection_warnings
from cli._parse import (
    at_least,
    check_device,
    check_dirs,
    check_out_dir,
    check_size,
    parse_lrs,
)

# Accepted values (stitchtrain.train.config.STITCHES, OBJECTIVES, INITS; tests keep them equal).
Stitch = Literal["linear", "mlp", "lora"]
Objective = Literal["lfm", "ffm", "tlt", "ffm+tlt", "lfm+tlt"]
Task = Literal["cls", "seg"]
Init = Literal["random", "lstsq", "identity"]
Head = Literal["fresh", "probe"]  # stitchtrain.train.config.HEADS, LR_SCHEDULES, SEG_DECODERS
LrSchedule = Literal["constant", "cosine"]
SegDecoder = Literal["grid", "fixed"]
Miou = Literal["mmseg", "gt-present"]  # stitchtrain.scoring.metrics.MIOU_DEFINITIONS
ScoreResolution = Literal["original", "input"]  # stitchtrain.scoring.segscore.SCORE_RESOLUTIONS
ExportFormat = Literal["safetensors", "onnx"]  # stitchtrain.hybrid.export.EXPORT_FORMATS

app = typer.Typer(
    help="Train stitch layers between vision foundation models from cached features.",
    no_args_is_help=True,
    rich_markup_mode=RICH_MARKUP_MODE,
)


from cli.experiments_app import experiments_app  # noqa: E402
from cli.tree_app import tree_app  # noqa: E402

app.add_typer(tree_app, name="tree")
app.registered_commands.extend(experiments_app.registered_commands)  # sweep, report, cka, ...


@app.callback()
def _main(version: bool | None = version_option()) -> None:
    """Commands are listed below; each has --help."""


def _names_a_store(text: str) -> bool:
    """Whether a ``positions`` argument names a store (an existing path, a ``.zarr`` or an
    fsspec URL) rather than an encoder (a preset, ``timm:...``, ``open_clip:...``)."""
    return "://" in text or text.rstrip("/").endswith(".zarr") or Path(text).exists()


def _encoder_facts(name: str) -> dict:
    """Readable name, depth, width, prefix and grid of an encoder name (presets without torch;
    a ``stitched:`` hybrid by its label)."""
    from featcache.encoders import PRESETS, preset_summary

    if name in PRESETS:
        return {"name": name, **preset_summary(name)}  # torch-free
    from featcache.encoders import load_encoder  # torch: only for names that are no preset

    encoder = load_encoder(name, random_init=True, device="meta")
    parts = getattr(encoder, "parts", None)  # a HybridEncoder's (stitchtrain.hybrid)
    return {
        "name": parts.label if parts is not None else name,
        "depth": encoder.depth,
        "width": encoder.width,
        "prefix": encoder.layout.prefix,
        "grid": encoder.grid,
    }


def _store_facts(store) -> dict:
    """Readable name (a hybrid's label), depth, width, prefix, grid and stored layers of a
    store's encoder."""
    from stitchtrain.data.names import encoder_label

    encoder = store.attrs["encoder"]
    return {
        "name": encoder_label(encoder),
        "depth": encoder["depth"],
        "width": encoder["width"],
        "prefix": tuple(encoder["layout"]["prefix"]),
        "grid": tuple(encoder["layout"]["grid"]),
        "layers": ",".join(map(str, store.layers)) or "none",
    }


@app.command()
@reports_errors
def positions(
    source: str = typer.Argument(
        ..., help="Source store (train split), or a source encoder (preset or library name)."
    ),
    target: str = typer.Argument(
        ..., help="Target store (train split), or a target encoder (preset or library name)."
    ),
    stitch: Stitch = typer.Option("mlp", help="Stitch layer kind (stores: which layer it reads)."),
    objective: Objective = typer.Option(
        "ffm+tlt", help="Training stages (stores: which target arrays they read)."
    ),
    pooled_only: bool = typer.Option(False, "--pooled-only", help="FFM on pooled outputs."),
) -> None:
    """Show where SOURCE can be stitched into TARGET and what the stitch must map.

    Position n runs source blocks 1..n, the stitch, then target blocks n+1..N, so n ranges
    over 1..min(N_source, N_target - 1) (n = N_target would leave no target block to run),
    for every objective and stitch kind (stitchtrain.data.positions; fit and sweep refuse others).
    Given two stores, it also lists the positions their stored layers allow for --objective and
    --stitch (fit's defaults): the positions fit accepts with these stores.
    """
    from rich.table import Table

    from featcache.errors import FeatcacheError
    from stitchtrain.data.positions import describe_range, valid_positions

    kinds = [_names_a_store(text) for text in (source, target)]
    if kinds[0] != kinds[1]:
        store, name = (source, target) if kinds[0] else (target, source)
        raise FeatcacheError(
            "Expected two stores or two encoder names as SOURCE and TARGET. Got the store "
            f"{store!r} and the encoder name {name!r} instead."
        )
    usable = None
    if kinds[0]:
        from featcache.store import FeatureStore
        from stitchtrain.data.pairing import usable_positions

        stores = [FeatureStore.open(url) for url in (source, target)]
        src, tgt = (_store_facts(store) for store in stores)
        options = {"stitch": stitch, "objective": objective, "pooled_only": pooled_only}
        usable = usable_positions(*stores, **options)
        title = f"{src['name']} -> {tgt['name']}"
    else:
        src, tgt = _encoder_facts(source), _encoder_facts(target)
        title = f"{src['name']} -> {tgt['name']}"
    table = Table(title=title)
    table.add_column("")
    table.add_column("source")
    table.add_column("target")
    stored = ("layers",) if usable is not None else ()  # stores: the layers each holds
    for key in ("depth", "width", "prefix", "grid", *stored):
        table.add_row(key, str(src[key]), str(tgt[key]))
    console.print(table)
    positions = describe_range(valid_positions(src["depth"], tgt["depth"]))
    console.print(f"stitch positions: {positions}")
    if usable is not None:
        allowed = ", ".join(map(str, usable)) or "none (extract the layers with --layers)"
        console.print(f"{objective} with a {stitch} stitch, these stores allow: {allowed}")
    console.print(f"stitch maps D={src['width']} -> D={tgt['width']} per token")
    if tuple(src["grid"]) != tuple(tgt["grid"]):
        console.print(f"patch grid resampled {src['grid']} -> {tgt['grid']} (bilinear)")


def _metrics_table(title: str, metrics: dict) -> Table:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, (int, str)):
            table.add_row(key, str(value))
    for key, value in interval_rows(metrics):
        table.add_row(key, value)
    return table


def _print_fit_plan(config, as_json: bool, reuse: list[str]) -> None:
    """``fit --dry-run``: the plan of ``config`` (stitchtrain.pipeline.plan), as a table or JSON."""
    import json

    from rich.table import Table

    from stitchtrain.pipeline.plan import plan_fit

    plan = plan_fit(config, reuse)
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
        return
    title = f"fit plan: {config.objective} {config.stitch} stitch at {config.position}"
    table = Table(title=title)
    table.add_column("")
    table.add_column("plan")
    for name, value in plan.rows():
        table.add_row(name, value)
    console.print(table)


@app.command()
@reports_errors
def fit(
    source: str = typer.Option(..., help="Source store (train split)."),
    target: str = typer.Option(..., help="Target store (train split)."),
    position: int = typer.Option(
        ...,
        callback=at_least(1),
        help="Stitch position n: source blocks 1..n, target n+1..N (>= 1).",
    ),
    out: str = typer.Option(..., help="Run dir (re-running the same command resumes it)."),
    stitch: Stitch = typer.Option("mlp", help="Stitch layer kind."),
    objective: Objective = typer.Option("ffm+tlt", help="Training stages, in order."),
    task: Task = typer.Option("cls", help="Classification or segmentation."),
    lr: str = typer.Option(
        "1e-3,5e-3,1e-2",
        "--lr",
        "--lrs",
        help="Learning-rate grid (positive numbers), chosen on validation. Sweep config [fit] "
        "key: lrs or lr (the other options --x-y are keys x_y there).",
    ),
    epochs: int = typer.Option(
        100, callback=at_least(1), help="Maximum epochs per stage and learning rate (>= 1)."
    ),
    patience: int = typer.Option(
        5, callback=at_least(1), help="Early-stopping patience (epochs) (>= 1)."
    ),
    batch_size: int | None = typer.Option(
        None, callback=at_least(1), help="Default: 256 for LFM, 128 otherwise (>= 1)."
    ),
    init: Init = typer.Option(
        "random",
        help="lstsq: linear stitch only; identity: a linear stitch at the identity (a check; "
        "sweeps self-stitch from random init).",
    ),
    val_fraction: float = typer.Option(
        0.1, help="Share of training rows for validation (0 < x < 1)."
    ),
    seed: int = typer.Option(0, help="Seed for splits, init and batch order."),
    head: Head = typer.Option(
        "fresh", help="TLT head: fresh (random) or probe (the target's fitted probe / decoder)."
    ),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay (>= 0)."),
    lr_schedule: LrSchedule = typer.Option(
        "constant", help="Per-step learning rate: constant, or cosine to 0 over --epochs."
    ),
    warmup_epochs: int = typer.Option(
        0, callback=at_least(0), help="Cosine: epochs of linear warm-up (>= 0, < --epochs)."
    ),
    seg_decoder: SegDecoder = typer.Option(
        "grid",
        help="Scoring LFM/FFM seg stitches: grid (lr grid + early stopping) or fixed (20 "
        "epochs at the first lr).",
    ),
    miou: Miou = typer.Option("mmseg", help="mIoU definition (seg)."),
    score_resolution: ScoreResolution = typer.Option(
        "original",
        help="Seg test mIoU on the original masks (logits upsampled, A.2.5; reads the "
        "dataset the store came from) or on the stored masks at the model input.",
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    memory_budget: str | None = typer.Option(
        None, help="Size such as 512MB, 8GB or 2GiB; default: 25% of free RAM."
    ),
    pooled_only: bool = typer.Option(False, "--pooled-only", help="FFM on pooled outputs."),
    allow_incomplete: bool = typer.Option(
        False,
        "--allow-incomplete",
        help="Train on the marked shards of incomplete stores (says how many rows were used).",
    ),
    allow_geometry_mismatch: bool = typer.Option(
        False,
        "--allow-geometry-mismatch",
        help="Pair stores whose tokens see different pixels (other crop / resize mode).",
    ),
    source_test: str | None = typer.Option(None, help="Source store of the test split."),
    target_test: str | None = typer.Option(None, help="Target store of the test split."),
    source_weights: str | None = typer.Option(None, help="Source weights (LoRA stitch)."),
    target_weights: str | None = typer.Option(None, help="Target weights (safetensors)."),
    random_init: bool = typer.Option(False, "--random-init", help="Stores of random models."),
    reuse: list[str] | None = typer.Option(
        None,
        "--reuse",
        help="Another run dir whose finished LFM / FFM stage this run takes instead of training "
        "it, when it is the same stage (stores, rows, options; stage-<stage>.json). Repeatable.",
    ),
    checkpoint_every: float = typer.Option(
        60.0,
        help="Seconds between epoch checkpoints (0: every epoch); learning-rate boundaries "
        "are always checkpointed. A resume replays at most this much work.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check every input, print the plan (stages, rows, loaders, steps, memory), exit.",
    ),
) -> None:
    """Train a stitch layer from two feature stores and evaluate it on the test split."""
    import json

    from cli._progress import FitProgress, progress_display

    check_out_dir(out)
    check_device(device)
    check_size(memory_budget)
    check_dirs(reuse, "--reuse")
    # torch: after the checks, so bad values exit fast
    from stitchtrain.pipeline.fit import fit as run_fit
    from stitchtrain.train.config import FitConfig
    from stitchtrain.train.rundir import check_run_dir

    config = FitConfig(
        source=source,
        target=target,
        position=position,
        out=out,
        stitch=stitch,
        objective=objective,
        task=task,
        lrs=parse_lrs(lr),
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
        init=init,
        val_fraction=val_fraction,
        seed=seed,
        head=head,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        warmup_epochs=warmup_epochs,
        seg_decoder=seg_decoder,
        miou=miou,
        score_resolution=score_resolution,
        device=device,
        memory_budget=memory_budget,
        pooled_only=pooled_only,
        source_test=source_test,
        target_test=target_test,
        source_weights=source_weights,
        target_weights=target_weights,
        random_init=random_init,
        allow_incomplete=allow_incomplete,
        allow_geometry_mismatch=allow_geometry_mismatch,
    )
    if dry_run:
        _print_fit_plan(config, as_json, reuse or [])
        return

    finished = check_run_dir(Path(out), config) == "finished"  # fit returns its metrics at once
    # stages -> learning rates -> epochs; with --json on stderr, so stdout holds the JSON only
    with (
        progress_display(err_console if as_json else console) as display,
        FitProgress(display) as progress,
    ):
        metrics = run_fit(config, progress, checkpoint_every=checkpoint_every, reuse=reuse or ())
    if finished:  # said once its metrics were read (a damaged metrics.json is an error instead)
        (err_console if as_json else console).print(
            f"{out} holds a finished run: its metrics are shown, nothing was retrained "
            "(another --out trains anew).",
            highlight=False,
            soft_wrap=True,
        )
    if reuse and not any("reused_from" in r for r in (metrics.get("stages") or {}).values()):
        err_console.print(
            "note: no finished LFM / FFM stage in the --reuse run dirs is this run's (other "
            "stores, rows or options, or a changed stitch file): it was trained."
        )
    for line in selection_warnings(metrics):
        err_console.print(line, highlight=False, markup=False)
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    table = _metrics_table(f"{objective} {stitch} stitch at {position}", metrics)
    for stage, result in (metrics.get("stages") or {}).items():
        grid = ", ".join(f"{row['lr']:g}" for row in result.get("grid", []))
        table.add_row(f"{stage} chosen lr", f"{result['lr']:g} of {grid}")
    console.print(table)
    console.print(f"run dir: {out}")


@app.command()
@reports_errors
def probe(
    store: str = typer.Option(..., help="Store (train split) whose pooled features to probe."),
    out: str = typer.Option(..., help="Run dir for the probe."),
    test_store: str | None = typer.Option(None, help="Test split store (default: found)."),
    lr: str = typer.Option(
        "1e-3,5e-3,1e-2", "--lr", "--lrs", help="Learning-rate grid (positive numbers)."
    ),
    epochs: int = typer.Option(100, callback=at_least(1), help="Maximum epochs (>= 1)."),
    patience: int = typer.Option(5, callback=at_least(1), help="Early-stopping patience (>= 1)."),
    seed: int = typer.Option(0, help="Seed."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
) -> None:
    """Linear probe on a store's pooled features: the encoder's own baseline."""
    import json

    from stitchtrain.scoring.probe import probe_store

    check_out_dir(out)
    metrics = probe_store(
        store,
        out,
        test_store=test_store,
        lrs=parse_lrs(lr),
        epochs=epochs,
        patience=patience,
        seed=seed,
    )
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        console.print(_metrics_table(f"linear probe: {metrics['encoder']}", metrics))


@app.command()
@reports_errors
def export(
    run_dir: str = typer.Argument(..., help="A finished fit run dir (the hybrid's stitch)."),
    out: str = typer.Option(..., help="Export folder to write (new or empty)."),
    stage: str | None = typer.Option(None, help="Stage to export (default: the run's final)."),
    with_weights: bool = typer.Option(
        False,
        "--with-weights",
        help="Also write both parents' weights (source/target.safetensors).",
    ),
    fmt: ExportFormat = typer.Option(
        "safetensors", "--format", help="onnx: also write model.onnx, checked in onnxruntime."
    ),
) -> None:
    """Write RUN_DIR's stitch as a hybrid encoder folder that stitched:DIR loads."""
    from stitchtrain.hybrid.export import export_hybrid

    config = export_hybrid(run_dir, out, stage=stage, with_weights=with_weights, fmt=fmt)
    console.print(f"exported {config['label']} (stage {config['stage']}) to {out}", markup=False)
    for name in config["files"]:
        console.print(f"  {name}", markup=False)
    if "onnx" in config:
        difference = config["onnx"]["max_abs_diff"]
        console.print(f"onnxruntime vs torch: max abs difference {difference:.3g}", markup=False)


@app.command(name="eval")
@reports_errors
def evaluate(
    run_dir: str = typer.Argument(..., help="A finished fit run dir."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
) -> None:
    """Test accuracy / mIoU and layer / final feature distances of a run (paper Figure 2)."""
    import json

    from stitchtrain.evaluate.evaluation import evaluate_run

    metrics = evaluate_run(run_dir)
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        console.print(_metrics_table(f"eval {run_dir}", metrics))


@app.command()
@reports_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Where data, stores and runs go."),
    epochs: int = typer.Option(
        8, callback=at_least(1), help="Epochs per stage (the paper uses up to 100) (>= 1)."
    ),
) -> None:
    """The whole pipeline on the built-in dataset, ending in a table like the paper's Table 1."""
    from rich.table import Table

    from cli._progress import progress_display
    from featcache.encoders import PRESETS  # noqa: F401  (fail early on a broken install)
    from stitchtrain.studies.demo import DEMO_MODELS, DEMO_POSITIONS, run_demo

    check_out_dir(out)
    with progress_display(console) as display:
        steps = _DemoSteps(display)
        result = run_demo(
            out, epochs=epochs, log=steps.done, on_step=steps.start, extract=steps.extract
        )
    short = {"dinov2-tiny": "D", "siglip2-tiny": "S"}
    table = Table(
        title=f"Test accuracy on {result.test_images} test images (toy scale)",
        caption="D = dinov2-tiny, S = siglip2-tiny",
    )
    table.add_column("stitch")
    table.add_column("objective")
    for position in DEMO_POSITIONS:
        table.add_column(f"position {position}", justify="right")
    for model in DEMO_MODELS:
        accuracy = f"{result.probes[model]:.3f}"
        table.add_row(f"{short[model]} linear probe", "-", *[accuracy] * len(DEMO_POSITIONS))
    for (source, target, objective), _ in _group(result.stitched).items():
        cells = [f"{result.stitched[source, target, objective, p]:.3f}" for p in DEMO_POSITIONS]
        kind = "self-stitch " if source == target else ""
        table.add_row(f"{kind}{short[source]} -> {short[target]}", objective.upper(), *cells)
    console.print(table)
    console.print(f"runs under {out / 'runs'}; stores under {out / 'stores'}")


class _DemoSteps:
    """The demo's progress (``stitchtrain.studies.demo.run_demo``'s callbacks): one task over all
    its steps, each step's result echoed as it ends; under it the step in progress: an
    extraction's spinner and bar, a probe's spinner, a fit's stages, learning rates, epochs."""

    def __init__(self, display) -> None:
        self.display = display
        self.steps = None  # made at the first step, when the number of steps is known
        self.close_current = None

    def start(self, kind: str, name: str, index: int, total: int):
        if self.steps is None:
            self.steps = self.display.task("demo step", total, completed=index, echo=True)
        if kind == "fit":
            from cli._progress import FitProgress

            fit_progress = FitProgress(self.display, parent=self.steps)
            self.close_current = fit_progress.close
            return fit_progress
        if kind == "probe":
            spinner = self.display.task(name, None, parent=self.steps)
            self.close_current = lambda: spinner.finish("")  # done() says how it went
        return None

    def extract(self, config) -> list[str]:
        from cli.extract_app import _extract_with_progress

        result = _extract_with_progress(config, self.display, parent=self.steps)
        return [store["url"] for store in result["stores"]]

    def done(self, line: str) -> None:
        if self.close_current is not None:
            self.close_current()
            self.close_current = None
        self.steps.advance(note=line)


def _group(stitched: dict) -> dict:
    groups: dict = {}
    for source, target, objective, _position in stitched:
        groups.setdefault((source, target, objective), True)
    return groups


@app.command()
@reports_errors
def show(
    run_dir: str = typer.Argument(..., help="A finished fit run dir."),
    images: int = typer.Option(8, callback=at_least(1), help="Show the first N valid rows."),
    rows: str | None = typer.Option(None, help="Comma-separated store rows instead of --images."),
    scale: Literal["percentile", "minmax"] = typer.Option(
        "percentile", help="Components to [0, 1]: 1st-99th percentile or min-max."
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    out: Path = typer.Option(Path("stitch.png"), help="Image file to write (.png, .pdf, ...)."),
    data: str | None = typer.Option(
        None, help="Where the stores' dataset is now, if moved (must match its manifest hash)."
    ),
) -> None:
    """Per test image (train when the run has no test stores): source layer-n tokens, the
    stitched tokens after the target tail and the target's own final tokens as PCA-to-RGB
    maps (stitched and target share the target's basis), and the per-patch cosine similarity
    of stitched vs target final (-1..1); rows labelled with class, id and mean cosine. Read
    from the stores; no image runs an encoder."""
    from cli._parse import parse_ints
    from featcache.show import check_image_path
    from stitchtrain.studies.show import show_run

    check_device(device)
    check_image_path(out)
    figure = show_run(
        run_dir,
        images=images,
        rows=parse_ints(rows, "--rows", example="0,5,9") if rows is not None else None,
        scale=scale,
        device=device,
        data=data,
    )
    line = f"wrote {figure.save(out)}: {figure.summary()}, {figure.extra['split']} split"
    console.print(line, highlight=False, markup=False)
    if figure.dataset_note:
        line = f"  input images not shown: {figure.dataset_note}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for row, note in zip(figure.rows.tolist(), figure.notes, strict=True):
        if note:
            console.print(f"  row {row}: image not shown ({note})", highlight=False, markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
