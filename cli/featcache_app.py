"""``featcache``: list encoders and run the built-in demo. Parse, call the library, print."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer

if TYPE_CHECKING:
    from rich.table import Table

from cli._console import (
    RICH_MARKUP_MODE,
    console,
    err_console,
    escape,
    reports_errors,
    version_option,
)
from cli._parse import at_least, check_out_dir, check_scheduler, parse_ints, parse_weights
from stitchtrain.data.sizes import format_size

# The accepted values, checked by typer at parse time and listed in --help (the library's own
# tuples: featcache.store.TOKEN_MODES and DTYPES; tests/test_redteam_cli.py keeps them equal).
Tokens = Literal["all", "prefix", "pooled"]
Dtype = Literal["float16", "bfloat16", "float32"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # "auto" + featcache.encoders.base.PRECISIONS
OnBadImage = Literal["fail", "skip"]
ResizeMode = Literal["shortest", "squash"]  # featcache.preprocess resize modes
Crop = Literal["box", "whole", "banner"]  # featcache.datasets.DataOptions.crop
Level = Literal["variant", "family", "manufacturer"]  # featcache.datasets.aircraft.AIRCRAFT_LEVELS
ShortClasses = Literal["error", "drop"]

app = typer.Typer(
    help="Run frozen vision foundation models once and cache their token features.",
    no_args_is_help=True,
    rich_markup_mode=RICH_MARKUP_MODE,
)


@app.callback()
def _main(version: bool | None = version_option()) -> None:
    """Commands are listed below; each has --help."""


def _prefix_text(prefix: tuple[str, ...]) -> str:
    registers = sum(p.startswith("reg") for p in prefix)
    parts = (["CLS"] if "cls" in prefix else []) + ([f"{registers} reg"] if registers else [])
    return " + ".join(parts) or "none"


def models_table() -> Table:
    from rich.table import Table

    from featcache.encoders import PRESETS, preset_summary  # torch-free

    table = Table(title="featcache encoder presets")
    for column in (
        "preset",
        "model",
        "depth",
        "width",
        "prefix",
        "grid",
        "resolution",
        "pooling",
        "weights",
    ):
        table.add_column(column, justify="right" if column in ("depth", "width") else "left")
    for name in PRESETS:
        info = preset_summary(name)
        table.add_row(
            name,
            info["model"],
            str(info["depth"]),
            str(info["width"]),
            _prefix_text(info["prefix"]),
            "x".join(map(str, info["grid"])),
            "x".join(map(str, info["image_size"])),
            info["pooling"],
            info["weights"],
        )
    return table


@app.command()
@reports_errors
def models() -> None:
    """List the encoder presets: depth, width, prefix tokens, patch grid, resolution, pooling."""
    console.print(models_table())


def _data_options_params():
    """The dataset options shared by ``extract`` and ``dataset describe`` (DataOptions)."""
    return {
        "crop": typer.Option(
            None,
            help="fMoW-RGB / FGVC-Aircraft: crop to the annotated box or keep the whole "
            "image; Aircraft: banner = all but its 20 px copyright banner (default: fMoW box, "
            "Aircraft whole).",
        ),
        "select": typer.Option(
            None,
            help="iNaturalist 2021: keep categories by taxonomy, FIELD=V1,V2 (e.g. "
            "family=Sphingidae,Pieridae,Pyralidae).",
        ),
        "level": typer.Option(None, help="FGVC-Aircraft class level (default: variant)."),
        "image_root": typer.Option(
            None, help="LLaVA-style JSON: folder its image paths are relative to (default: its)."
        ),
        "image_column": typer.Option(
            None, help="Hugging Face parquet: image column (default: the Image feature)."
        ),
        "label_column": typer.Option(
            None, help="Hugging Face parquet: label column (default: the ClassLabel feature)."
        ),
        "per_class": typer.Option(
            None,
            help="Class-balanced subset: N per class in every split, or SPLIT=N,SPLIT=N "
            "drawn disjointly from --subset-from (e.g. train=230,test=26).",
        ),
        "subset_from": typer.Option(
            None,
            help="Splits the SPLIT=N subsets are drawn from, comma-separated (default: train).",
        ),
        "subset_seed": typer.Option(0, help="Seed of the class-balanced draw."),
        "short_classes": typer.Option(
            "error", help="A class too small for --per-class: error, or drop it."
        ),
    }


_DATA = _data_options_params()


def _data_options(params: dict):
    """The ``_DATA`` options among a command's parameters (its ``locals()``) ->
    ``featcache.datasets.DataOptions`` (bad values: one-line errors)."""
    from featcache.datasets import DataOptions
    from featcache.datasets.inat import parse_select

    values = {name: params[name] for name in _DATA}
    select = values.pop("select")
    return DataOptions(select=None if select is None else parse_select(select), **values)


def _extract_with_progress(config, display, *, parent=None, scheduler: str | None = None) -> dict:
    """Plan (a spinner while the models load), print the planned stores, extract the missing
    shards with a progress task (images k of N, img/s, MB/s, ETA) on ``display``
    (``cli._progress``); stores already complete say so and write nothing."""
    from rich.table import Table

    from featcache.extract import images_to_extract, plan_extraction, run_extraction

    with display.spinner(f"loading {', '.join(config.models)}", parent=parent):
        plan = plan_extraction(config)
    table = Table(title=f"planned stores ({plan.split}: {len(plan.records)} images)")
    for column in ("encoder", "layers", "store", "estimated size"):
        table.add_column(column)
    for encoder, spec, url in zip(plan.encoders, plan.specs, plan.urls, strict=True):
        layers = ",".join(map(str, spec.layers))
        size = format_size(plan.estimated_bytes(spec))
        table.add_row(encoder.name, layers, url, size)
    display.log(table)
    todo = images_to_extract(plan)
    if todo == 0:  # the run below only reopens the stores (and checks --scheduler)
        display.log(f"extract {plan.split}: complete, nothing to do ({len(plan.urls)} stores)")
    task = display.task(f"extract {plan.split}", total=todo, parent=parent) if todo else None
    started, written = time.perf_counter(), {"bytes": 0}

    def advance(images: int, nbytes: int) -> None:  # called only when shards are written
        written["bytes"] += nbytes
        elapsed = max(time.perf_counter() - started, 1e-9)
        done = task.completed + images
        rate = f"{done / elapsed:.1f} img/s {written['bytes'] / elapsed / 1e6:.1f} MB/s"
        task.advance(images, note=rate)

    try:
        if scheduler is None:
            result = run_extraction(plan, progress=advance)
        else:
            from featcache.distributed import connect, extract_on_dask

            with connect(scheduler) as client:
                display.log(f"dask scheduler: {client.scheduler.address}")
                result = extract_on_dask(plan, client, progress=advance)
    finally:
        if task is not None:
            task.finish()
    result["seconds"] = time.perf_counter() - started
    return result


@app.command()
@reports_errors
def extract(
    model: list[str] = typer.Option(..., "--model", help="Encoder (repeat for several)."),
    data: str = typer.Option(
        ...,
        help="Image folder (class subfolders; ADE20K, fMoW-RGB, iNat 2021, FGVC-Aircraft "
        "layouts), CSV/JSONL manifest, LLaVA-style .json, parquet files or folder, or .tar "
        "shards (brace pattern, glob, s3://).",
    ),
    out: str = typer.Option(..., help="Root for stores: local path or fsspec URL (s3://...)."),
    layers: str = typer.Option(
        "2,6,10,14,18,22,24", help="Layers to store: comma-separated integers 0..depth, e.g. 2,6."
    ),
    split: str | None = typer.Option(None, help="Dataset split (default: the first)."),
    batch_size: int = typer.Option(
        32, callback=at_least(1), help="Images per forward pass (>= 1)."
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    tokens: Tokens = typer.Option("all", help="Tokens to store (pooled: no layers)."),
    compression: str = typer.Option(
        "none", help="none, zstd or bitround:K (keep K of 10 float16 mantissa bits, 1 <= K <= 10)."
    ),
    dtype: Dtype = typer.Option("float16", help="Storage dtype (bfloat16 as uint16 bits)."),
    precision: Precision = typer.Option(
        "auto",
        help="Compute precision (autocast): fp32, bf16 or fp16; auto = bf16 on CUDA, fp32 on "
        "CPU. Recorded in the store and its id; info shows its error against fp32.",
    ),
    shard: str = typer.Option("0/1", help="I/N: process shards i with i % N == I."),
    shard_size: int = typer.Option(
        256, callback=at_least(1), help="Images per shard (unit of writing/resuming) (>= 1)."
    ),
    on_bad_image: OnBadImage = typer.Option("fail", help="skip: record unreadable images, go on."),
    num_workers: int | None = typer.Option(
        None, callback=at_least(0), help="Decoding threads (>= 0; default: the cores available)."
    ),
    weights: list[str] = typer.Option([], help="NAME=FILE.safetensors weights for a model."),
    random_init: bool = typer.Option(False, "--random-init", help="Seeded random weights."),
    reduce_zero_label: bool | None = typer.Option(
        None,
        "--reduce-zero-label/--keep-zero-label",
        help="Mask value 0 -> ignore, k -> k-1 (mmsegmentation's convention). Default: the "
        "dataset layout's (on for ADE20K, off for folders and manifests).",
    ),
    crop_pct: float | None = typer.Option(
        None,
        help="Centre-crop fraction for every --model (0 < F <= 1; default: the model's, 1.0 "
        "for presets).",
    ),
    resize_mode: ResizeMode | None = typer.Option(
        None, help="shortest (keep aspect, crop) or squash, for every --model (default: model's)."
    ),
    scheduler: str | None = typer.Option(
        None, help="Run shards as Dask tasks: local, local:N or tcp://HOST:PORT."
    ),
    crop: Crop | None = _DATA["crop"],
    select: str | None = _DATA["select"],
    level: Level | None = _DATA["level"],
    per_class: str | None = _DATA["per_class"],
    subset_from: str | None = _DATA["subset_from"],
    subset_seed: int = _DATA["subset_seed"],
    short_classes: ShortClasses = _DATA["short_classes"],
    image_root: str | None = _DATA["image_root"],
    image_column: str | None = _DATA["image_column"],
    label_column: str | None = _DATA["label_column"],
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary at the end."),
) -> None:
    """Extract layer token features of one or more encoders into Zarr v3 stores."""
    import json

    from cli._progress import progress_display
    from featcache.extract import ExtractConfig, parse_shard

    check_scheduler(scheduler)
    config = ExtractConfig(
        models=model,
        data=data,
        out=out,
        layers=list(parse_ints(layers, "--layers", empty=tokens == "pooled")),
        split=split,
        batch_size=batch_size,
        device=device,
        tokens=tokens,
        compression=compression,
        dtype=dtype,
        shard=parse_shard(shard),
        on_bad_image=on_bad_image,
        num_workers=num_workers,
        precision=precision,
        shard_size=shard_size,
        random_init=random_init,
        reduce_zero_label=reduce_zero_label,
        weights=parse_weights(weights),
        crop_pct=crop_pct,
        resize_mode=resize_mode,
        data_options=_data_options(locals()),
    )
    out_console = err_console if as_json else console  # --json: stdout holds the JSON only
    with progress_display(out_console) as display:
        result = _extract_with_progress(config, display, scheduler=scheduler)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for summary in result["stores"]:
        state = (
            "complete"
            if summary["complete"]
            else (f"{summary['shards_done']}/{summary['num_shards']} shards")
        )
        line = f"[bold]{escape(summary['encoder'])}[/]: {escape(summary['url'])} ({state})"
        console.print(line, markup=True)
        for item in summary["skipped"]:
            console.print(f"  skipped {item['id']}: {item['reason']}")


def stores_table(root: str) -> Table:
    """One row per store under ``root``."""
    from rich.table import Table

    from featcache.store import find_stores

    table = Table(title=f"stores under {root}")
    for column in ("store", "encoder", "dataset", "split", "layers", "images", "size", "complete"):
        table.add_column(column, overflow="fold")
    for store in find_stores(root):
        s = store.summary()
        table.add_row(
            s["url"],
            s["encoder"],
            s["dataset"],
            s["split"],
            ",".join(map(str, s["layers"])) or "-",
            str(s["images"]),
            format_size(s["bytes"]),
            "yes" if s["complete"] else f"no ({s['shards_done']}/{s['num_shards']})",
        )
    return table


@app.command(name="ls")
@reports_errors
def list_stores(root: str = typer.Argument(..., help="Directory or URL holding stores.")) -> None:
    """List the stores under ROOT: encoder, dataset, split, layers, images, size, complete."""
    from featcache.errors import FeatcacheError

    if "://" not in root and not Path(root).exists():
        raise FeatcacheError(
            f"Expected ROOT to be a directory or URL. Got {root}, which is absent."
        )
    console.print(stores_table(root))


@app.command()
@reports_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Where the dataset and stores go."),
) -> None:
    """Generate the built-in dataset and extract it with two tiny encoders of two families."""
    from cli._progress import progress_display
    from featcache.demo_data import demo_extract_configs

    check_out_dir(out)
    console.print(models_table())
    configs = demo_extract_configs(out)
    console.print(f"dataset: [bold]{escape(configs[0].data)}[/]", markup=True)
    with progress_display(console) as display:
        for config in configs:
            _extract_with_progress(config, display)
    console.print(stores_table(str(out / "stores")))


@app.command()
@reports_errors
def info(
    store: str = typer.Argument(..., help="Store path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Summarise a store: encoder, dataset, split, layers, images, size, completion and
    geometry (--json: every attribute and array)."""
    import json

    from rich.table import Table

    from featcache.store import FeatureStore

    opened = FeatureStore.open(store)
    if not as_json:
        table = Table(title=f"store {opened.url}", show_header=False)
        table.add_column("", style="bold")
        table.add_column("", overflow="fold")
        for name, value in _info_rows(opened.summary(), opened.attrs):
            table.add_row(name, value)
        console.print(table)
        return
    payload = {
        "summary": opened.summary(),
        "attrs": opened.attrs,
        "arrays": {
            name: {"shape": list(a.shape), "dtype": str(a.dtype)}
            for name, a in opened.group.arrays()
        },
    }
    if "layers" in opened.group:
        payload["arrays"].update(
            {
                f"layers/{n}": {"shape": list(a.shape), "dtype": str(a.dtype)}
                for n, a in opened.group["layers"].arrays()
            }
        )
    print(json.dumps(payload, indent=2, default=str))


def _precision_text(summary: dict) -> str:
    """The compute precision and its measured error against fp32 (``precision_error``)."""
    precision, error = summary.get("precision", "fp32"), summary.get("precision_error")
    if precision == "fp32":
        return "fp32 (error against fp32: 0)"
    if not error:
        return f"{precision} autocast (error against fp32 not measured)"
    scale = error.get("mean_abs_fp32")
    relative = f", {error['mean_abs'] / scale:.2%} of mean |x|" if scale else ""
    return (
        f"{precision} autocast; against fp32 on the first {error['images']} images: max |error| "
        f"{error['max_abs']:.3g}, mean {error['mean_abs']:.3g}{relative}"
    )


def _info_rows(summary: dict, attrs: dict) -> list[tuple[str, str]]:
    """``featcache info``'s lines: (name, value) from ``FeatureStore.summary()`` and attrs."""
    encoder = attrs["encoder"]
    layout = encoder.get("layout", {})
    geometry = encoder.get("geometry") or {}
    arrays = [name for name in ("final", "pooled", "masks") if name in attrs.get("arrays", [])]
    layers = ",".join(map(str, summary["layers"])) or "none"
    done = f"{summary['shards_done']}/{summary['num_shards']} shards"
    rows = [
        ("encoder", f"{summary['encoder']} (fingerprint {summary['fingerprint']})"),
        (
            "architecture",
            f"depth {encoder['depth']}, width {encoder['width']}, prefix "
            f"{_prefix_text(tuple(layout.get('prefix', ())))}",
        ),
        ("dataset", str(summary["dataset"])),
        ("split", str(summary["split"])),
        ("layers", f"{layers} (tokens {summary['tokens']}; also {', '.join(arrays) or '-'})"),
        ("images", f"{summary['images']} ({len(summary['skipped'])} skipped)"),
        ("dtype", f"{summary['dtype']}, compression {attrs.get('compression', '-')}"),
        ("precision", _precision_text(summary)),
        ("size", format_size(summary["bytes"])),
        ("complete", f"yes ({done})" if summary["complete"] else f"no ({done})"),
    ]
    if geometry:
        size = "x".join(map(str, geometry["image_size"]))
        grid = "x".join(map(str, geometry["grid"]))
        patch = "x".join(map(str, geometry["patch_size"]))
        rows.append(
            (
                "geometry",
                f"{size} input, resize {geometry['resize_mode']}, crop {geometry['crop_pct']}, "
                f"grid {grid} of {patch} px patches",
            )
        )
    return rows


@app.command()
@reports_errors
def verify(
    store: str = typer.Argument(..., help="Store path or URL."),
    fingerprint: str | None = typer.Option(None, help="Expected encoder fingerprint."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check markers, checksums, NaN-free rows and fingerprint; exit 1 on any fault (a store
    that cannot be opened is one)."""
    import json

    from featcache.store import FeatureStore, StoreError

    try:
        faults = FeatureStore.open(store).verify(expected_fingerprint=fingerprint)
    except StoreError as err:  # missing, unreadable or not a featcache store
        faults = [str(err)]
    if as_json:
        print(json.dumps({"store": store, "ok": not faults, "faults": faults}))
    else:
        for fault in faults:
            err_console.print(f"[red]fault:[/] {escape(fault)}", markup=True, highlight=False)
        if not faults:
            console.print(f"[green]ok[/] {escape(store)}", markup=True)
    if faults:
        raise typer.Exit(code=1)


@app.command()
@reports_errors
def rm(store: str = typer.Argument(..., help="Store path or URL to delete.")) -> None:
    """Delete a featcache store, of any format and complete or not; refuses anything else
    (a plain directory, a foreign Zarr group, a store that also holds files featcache did not
    write)."""
    from featcache.store import remove_store

    remove_store(store)
    console.print(f"removed {store}")


@app.command()
@reports_errors
def show(
    store: str = typer.Argument(..., help="Store path or URL."),
    layer: list[str] = typer.Option(
        [], help="Stored layer number or 'final' (repeat; default: up to 4 stored layers)."
    ),
    images: int = typer.Option(8, callback=at_least(1), help="Show the first N valid rows."),
    rows: str | None = typer.Option(None, help="Comma-separated store rows instead of --images."),
    scale: Literal["percentile", "minmax"] = typer.Option(
        "percentile", help="Components to [0, 1]: 1st-99th percentile or min-max."
    ),
    out: Path = typer.Option(Path("maps.png"), help="Image file to write (.png, .pdf, ...)."),
) -> None:
    """PCA-to-RGB maps of stored patch tokens: per image row, the image as the model saw it,
    then each layer's map (3 components fitted per layer over the shown images)."""
    from featcache.show import check_image_path, show_store

    check_image_path(out)
    layers = [part for value in layer for part in value.split(",") if part.strip()]
    figure = show_store(
        store,
        layers=layers or None,
        images=images,
        rows=parse_ints(rows, "--rows", example="0,5,9") if rows is not None else None,
        scale=scale,
    )
    console.print(f"wrote {figure.save(out)}: {figure.summary()}", highlight=False, markup=False)
    for row, note in zip(figure.rows.tolist(), figure.notes, strict=True):
        if note:
            console.print(f"  row {row}: image not shown ({note})", highlight=False, markup=False)


dataset_app = typer.Typer(help="Inspect datasets before extracting them.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command()
@reports_errors
def describe(
    data: str = typer.Argument(..., help="What --data of extract takes."),
    crop: Crop | None = _DATA["crop"],
    select: str | None = _DATA["select"],
    level: Level | None = _DATA["level"],
    per_class: str | None = _DATA["per_class"],
    subset_from: str | None = _DATA["subset_from"],
    subset_seed: int = _DATA["subset_seed"],
    short_classes: ShortClasses = _DATA["short_classes"],
    image_root: str | None = _DATA["image_root"],
    image_column: str | None = _DATA["image_column"],
    label_column: str | None = _DATA["label_column"],
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Classes, images per split and per class, and what a --per-class subset would hold,
    without extracting."""
    import dataclasses
    import json

    from rich.table import Table

    from featcache.datasets import load_dataset
    from featcache.datasets.subsets import describe as describe_dataset

    options = _data_options(locals())
    dataset = load_dataset(data, options=dataclasses.replace(options, per_class=None))
    summary = describe_dataset(dataset, options)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(
        f"[bold]{escape(summary['source'])}[/] ({summary['format']}): "
        f"{len(summary['classes'])} classes {escape(summary['selection'] or '')}",
        markup=True,
        highlight=False,
    )
    table = Table(title="splits")
    for column in ("split", "images", "classes present", "min / max per class"):
        table.add_column(column)
    for split, info in summary["splits"].items():
        counts = list(info["per_class"].values()) or [0]
        present = sum(c > 0 for c in counts)
        table.add_row(split, str(info["images"]), str(present), f"{min(counts)} / {max(counts)}")
    console.print(table)
    shown = 40
    classes = Table(title=f"images per class (first {shown})" if len(summary["classes"]) > shown
                    else "images per class")  # fmt: skip
    classes.add_column("class")
    for split in summary["splits"]:
        classes.add_column(split, justify="right")
    for name in summary["classes"][:shown]:
        counts = (str(i["per_class"][name]) for i in summary["splits"].values())
        classes.add_row(escape(name), *counts)  # class names print as written
    console.print(classes)
    if "subset" in summary:
        subset = summary["subset"]
        holds = Table(title=f"--per-class {per_class} (seed {subset['seed']})")
        for column in ("split", "from", "per class", "images", "classes"):
            holds.add_column(column)
        for split, count in subset["per_class"].items():
            held = subset["holds"][split]
            holds.add_row(split, ",".join(subset["from"][split]), str(count),
                          str(held["images"]), str(held["classes"]))  # fmt: skip
        console.print(holds)
        for name, need in subset["short_classes"].items():
            fate = "dropped" if short_classes == "drop" else "an error: --short-classes drop"
            console.print(
                f"  short: {name!r} has {need['have']} of {need['need']} ({fate})",
                highlight=False,
                markup=False,
            )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
