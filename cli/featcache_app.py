"""``featcache``: list encoders and run the built-in demo. Parse, call the library, print."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import typer
from rich.table import Table

from cli._console import console, err_console, reports_errors, version_option
from cli._parse import at_least, check_out_dir, check_scheduler, parse_ints, parse_weights

# The accepted values, checked by typer at parse time and listed in --help (the library's own
# tuples: featcache.store.TOKEN_MODES and DTYPES; tests/test_redteam_cli.py keeps them equal).
Tokens = Literal["all", "prefix", "pooled"]
Dtype = Literal["float16", "bfloat16", "float32"]
OnBadImage = Literal["fail", "skip"]
ResizeMode = Literal["shortest", "squash"]  # featcache.preprocess resize modes

app = typer.Typer(
    help="Run frozen vision foundation models once and cache their token features.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _main(version: bool | None = version_option()) -> None:
    """Commands are listed below; each has --help."""


def _prefix_text(prefix: tuple[str, ...]) -> str:
    registers = sum(p.startswith("reg") for p in prefix)
    parts = (["CLS"] if "cls" in prefix else []) + ([f"{registers} reg"] if registers else [])
    return " + ".join(parts) or "none"


def models_table() -> Table:
    from featcache.encoders import PRESETS, describe_preset

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
        info = describe_preset(name)
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


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TB"


def _extract_with_progress(
    config, out_console, *, transient: bool = False, scheduler: str | None = None
) -> dict:
    """Plan, print the planned stores, run with a progress bar (images/s, MB/s, ETA)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from featcache.extract import images_in_shards, plan_extraction, run_extraction

    plan = plan_extraction(config)
    table = Table(title=f"planned stores ({plan.split}: {len(plan.records)} images)")
    for column in ("encoder", "layers", "store", "estimated size"):
        table.add_column(column)
    for encoder, spec, url in zip(plan.encoders, plan.specs, plan.urls, strict=True):
        layers = ",".join(map(str, spec.layers))
        size = _human_bytes(plan.estimated_bytes(spec))
        table.add_row(encoder.name, layers, url, size)
    out_console.print(table)
    total = images_in_shards(plan, config.shard_size, config.shard[1], config.shard[0])
    started = time.perf_counter()
    written = {"bytes": 0}
    with Progress(
        TextColumn("[bold]extract"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=out_console,
        transient=transient,
    ) as bar:
        task = bar.add_task("extract", total=total, rate="")

        def advance(images: int, nbytes: int) -> None:
            written["bytes"] += nbytes
            elapsed = max(time.perf_counter() - started, 1e-9)
            done = bar.tasks[0].completed + images
            rate = f"{done / elapsed:.1f} img/s {written['bytes'] / elapsed / 1e6:.1f} MB/s"
            bar.update(task, advance=images, rate=rate)

        if scheduler is None:
            result = run_extraction(plan, progress=advance)
        else:
            from featcache.distributed import connect, extract_on_dask

            with connect(scheduler) as client:
                out_console.print(f"dask scheduler: {client.scheduler.address}")
                result = extract_on_dask(plan, client, progress=advance)
    result["seconds"] = time.perf_counter() - started
    return result


@app.command()
@reports_errors
def extract(
    model: list[str] = typer.Option(..., "--model", help="Encoder (repeat for several)."),
    data: str = typer.Option(..., help="Image folder (one subfolder per class) or CSV/JSONL."),
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
    shard: str = typer.Option("0/1", help="I/N: process shards i with i % N == I."),
    shard_size: int = typer.Option(
        256, callback=at_least(1), help="Images per shard (unit of writing/resuming) (>= 1)."
    ),
    on_bad_image: OnBadImage = typer.Option("fail", help="skip: record unreadable images, go on."),
    num_workers: int = typer.Option(2, callback=at_least(0), help="Decoding threads (>= 0)."),
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
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary at the end."),
) -> None:
    """Extract layer token features of one or more encoders into Zarr v3 stores."""
    import json

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
        shard_size=shard_size,
        random_init=random_init,
        reduce_zero_label=reduce_zero_label,
        weights=parse_weights(weights),
        crop_pct=crop_pct,
        resize_mode=resize_mode,
    )
    out_console = err_console if as_json else console
    result = _extract_with_progress(config, out_console, transient=as_json, scheduler=scheduler)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for summary in result["stores"]:
        state = (
            "complete"
            if summary["complete"]
            else (f"{summary['shards_done']}/{summary['num_shards']} shards")
        )
        console.print(f"[bold]{summary['encoder']}[/]: {summary['url']} ({state})")
        for item in summary["skipped"]:
            console.print(f"  skipped {item['id']}: {item['reason']}")


def stores_table(root: str) -> Table:
    """One row per store under ``root``."""
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
            _human_bytes(s["bytes"]),
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
    from featcache.demo_data import demo_extract_configs

    check_out_dir(out)
    console.print(models_table())
    configs = demo_extract_configs(out)
    console.print(f"dataset: [bold]{configs[0].data}[/]")
    for config in configs:
        _extract_with_progress(config, console)
    console.print(stores_table(str(out / "stores")))


@app.command()
@reports_errors
def info(
    store: str = typer.Argument(..., help="Store path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a store's attributes, arrays and completion."""
    import json

    from featcache.store import FeatureStore

    opened = FeatureStore.open(store)
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
    if as_json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        console.print_json(json.dumps(payload, default=str))


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
            err_console.print(f"[red]fault:[/] {fault}", highlight=False)
        if not faults:
            console.print(f"[green]ok[/] {store}")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
