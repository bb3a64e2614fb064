"""``featcache extract``: the command, its accepted values and the dataset options it shares with
``featcache dataset describe``, and the progress display of an extraction (also the demos').
Parse, call the library, print."""

from __future__ import annotations

import time
from typing import Literal

import typer

from cli._console import console, err_console, escape, reports_errors
from cli._parse import at_least, check_scheduler, parse_weights
from stitchtrain.data.sizes import format_size

# The accepted values, checked by typer at parse time and listed in --help (the library's own
# tuples: featcache.store.TOKEN_MODES and DTYPES; tests/test_redteam_cli.py keeps them equal).
Tokens = Literal["all", "prefix", "pooled"]
Dtype = Literal["float16", "bfloat16", "float32"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # "auto" + featcache.encoders.base.PRECISIONS
OnBadImage = Literal["fail", "skip"]
OnChangedData = Literal["error", "reextract"]  # featcache.extract.ExtractConfig.on_changed_data
ResizeMode = Literal["shortest", "squash"]  # featcache.preprocess resize modes
Crop = Literal["box", "whole", "banner"]  # featcache.datasets.DataOptions.crop
Level = Literal["variant", "family", "manufacturer"]  # featcache.datasets.aircraft.AIRCRAFT_LEVELS
ShortClasses = Literal["error", "drop"]

extract_app = typer.Typer(
    help="Extract token features into stores.",
    no_args_is_help=True,
    add_completion=False,
)


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
        "subset_seed": typer.Option(
            0, help="Seed of the class-balanced draw and of the --test-fraction split."
        ),
        "short_classes": typer.Option(
            "error", help="A class too small for --per-class: error, or drop it."
        ),
        "test_fraction": typer.Option(
            None,
            help="A folder of class folders without a test split: hold out F (0 < F < 1) of "
            "each class as split test, seeded by --subset-seed; give it to both extractions.",
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


@extract_app.command()
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
    layers: str | None = typer.Option(
        None,
        help="Layers to store: comma-separated 0..depth, negative from the end (-1: the last "
        "block), e.g. 2,6,-1; or all. Default: 2,6,10,14,18,22,24 for 24 blocks, the same "
        "fractions of the depth otherwise (12 blocks: 1,3,5,7,9,11,12).",
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
    on_changed_data: OnChangedData = typer.Option(
        "error",
        help="A done shard whose files changed (size or mtime) since: error (name the first "
        "changed file) or reextract (extract that shard again).",
    ),
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
    test_fraction: float | None = _DATA["test_fraction"],
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
        layers="default" if layers is None else layers,
        split=split,
        batch_size=batch_size,
        device=device,
        tokens=tokens,
        compression=compression,
        dtype=dtype,
        shard=parse_shard(shard),
        on_bad_image=on_bad_image,
        on_changed_data=on_changed_data,
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
