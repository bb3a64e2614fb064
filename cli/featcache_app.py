"""``featcache``: list encoders and run the built-in demo. Parse, call the library, print.

The app, ``models``, ``demo`` and the store commands (ls, info, verify, rm, show) are here;
``extract`` is registered from ``cli.extract_app``, the ``dataset`` group from
``cli.dataset_app``.
"""

from __future__ import annotations

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
from cli._parse import at_least, check_out_dir, parse_ints
from cli.dataset_app import dataset_app
from cli.extract_app import _extract_with_progress, extract_app
from stitchtrain.data.sizes import format_size

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


app.registered_commands.extend(extract_app.registered_commands)  # extract


def stores_table(root: str) -> tuple[Table | str, list[str]]:
    """``featcache ls``'s table: one row per store under ``root``, images (rows minus skipped
    ones) and skipped (images unreadable at extraction, ``--on-bad-image skip``) apart, and a
    store that does not open marked ``damaged``; with the table, one line per damaged store
    giving its reason and the ``featcache verify`` command. With no store under ``root``,
    one line saying so."""
    from rich.table import Table

    from featcache.store import scan_stores

    stores, damaged = scan_stores(root)
    if not stores and not damaged:
        return f"no featcache stores under {root}", []
    table = Table(title=f"stores under {root}")
    columns = ("store", "encoder", "dataset", "split", "layers", "images", "skipped", "size")
    for column in (*columns, "complete"):
        table.add_column(column, overflow="fold")
    rows = []
    for store in stores:
        s = store.summary()
        rows.append(
            (
                s["url"],
                s["label"],
                s["dataset"],
                s["split"],
                ",".join(map(str, s["layers"])) or "-",
                str(s["images"] - len(s["skipped"])),
                str(len(s["skipped"])),
                format_size(s["bytes"]),
                "yes" if s["complete"] else f"no ({s['shards_done']}/{s['num_shards']})",
            )
        )
    rows += [(d.url, *["-"] * (len(columns) - 1), "damaged") for d in damaged]
    for row in sorted(rows):
        table.add_row(*row)
    lines = [
        f"damaged: {d.url}: {d.reason} Run `featcache verify {d.url}` for every fault."
        for d in damaged
    ]
    return table, lines


def print_stores(root: str) -> None:
    """Print ``stores_table(root)``: the table, then each damaged store's line."""
    table, lines = stores_table(root)
    console.print(table, highlight=False, soft_wrap=True)
    for line in lines:  # one line each, however long
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def stores_json(root: str) -> dict:
    """``featcache ls --json``: every store's summary (``FeatureStore.summary``) and every
    damaged store's URL, reason and ``featcache verify`` command."""
    from featcache.store import scan_stores

    stores, damaged = scan_stores(root)
    return {
        "root": root,
        "stores": [store.summary() for store in stores],
        "damaged": [
            {"url": d.url, "reason": d.reason, "verify": f"featcache verify {d.url}"}
            for d in damaged
        ],
    }


@app.command(name="ls")
@reports_errors
def list_stores(
    root: str = typer.Argument(..., help="Directory or URL holding stores."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the stores under ROOT: encoder, dataset, split, layers, images, skipped, size,
    complete (images: readable ones; skipped: unreadable, --on-bad-image skip). A store that
    does not open is listed as damaged, with its reason on a line below the table and the
    featcache verify command to run. No store under ROOT: one line saying so. Exit status 0
    (--json: the stores' summaries and the damaged stores)."""
    import json

    from featcache.errors import FeatcacheError

    if "://" not in root and not Path(root).exists():
        raise FeatcacheError(
            f"Expected ROOT to be a directory or URL. Got {root}, which is absent."
        )
    if as_json:
        print(json.dumps(stores_json(root), indent=2, default=str))
        return
    print_stores(root)


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
    print_stores(str(out / "stores"))


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


def _hybrid_text(hybrid: dict) -> str:
    """A hybrid store's encoder as ``featcache info`` describes it: its label, source and target
    (names, fingerprints), stitch kind, position, stage and stitch digest."""
    source, target = hybrid["source"], hybrid["target"]
    return (
        f"{hybrid['label']}: source {source['name']} (fingerprint {source['fingerprint']}), "
        f"{hybrid['stitch']} stitch at position {hybrid['position']} (stage {hybrid['stage']}, "
        f"SHA-256 {hybrid['stitch_sha256'][:16]}...), target {target['name']} (fingerprint "
        f"{target['fingerprint']})"
    )


def _info_rows(summary: dict, attrs: dict) -> list[tuple[str, str]]:
    """``featcache info``'s lines: (name, value) from ``FeatureStore.summary()`` and attrs."""
    encoder = attrs["encoder"]
    layout = encoder.get("layout", {})
    geometry = encoder.get("geometry") or {}
    arrays = [name for name in ("final", "pooled", "masks") if name in attrs.get("arrays", [])]
    layers = ",".join(map(str, summary["layers"])) or "none"
    done = f"{summary['shards_done']}/{summary['num_shards']} shards"
    skipped = len(summary["skipped"])  # rows of images unreadable at extraction
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
        ("images", f"{summary['images'] - skipped} readable, {skipped} skipped"),
        ("dtype", f"{summary['dtype']}, compression {attrs.get('compression', '-')}"),
        ("precision", _precision_text(summary)),
        ("size", format_size(summary["bytes"])),
        ("complete", f"yes ({done})" if summary["complete"] else f"no ({done})"),
    ]
    hybrid = encoder.get("hybrid")
    if hybrid:  # a stitched: encoder (Hybrid VFMs): its parents, position, stage and stitch
        rows.insert(1, ("hybrid", _hybrid_text(hybrid)))
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

    notes = []  # what the store lacks that is not a fault (a format-2 store: row digests)
    try:
        opened = FeatureStore.open(store)
        notes = opened.notes()
        faults = opened.verify(expected_fingerprint=fingerprint)
    except StoreError as err:  # missing, unreadable or not a featcache store
        faults = [str(err)]
    if as_json:
        print(json.dumps({"store": store, "ok": not faults, "faults": faults, "notes": notes}))
    else:
        for note in notes:
            console.print(f"[yellow]note:[/] {escape(note)}", markup=True, highlight=False)
        for fault in faults:
            err_console.print(  # one line per fault, however long
                f"[red]fault:[/] {escape(fault)}", markup=True, highlight=False, soft_wrap=True
            )
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
    data: str | None = typer.Option(
        None, help="Where the store's dataset is now, if moved (must match its manifest hash)."
    ),
) -> None:
    """PCA-to-RGB maps of stored patch tokens: per image row (labelled with its class and id),
    the image as the model saw it, then each layer's map (3 components fitted per layer over
    the shown images)."""
    from featcache.show import check_image_path, show_store

    check_image_path(out)
    layers = [part for value in layer for part in value.split(",") if part.strip()]
    figure = show_store(
        store,
        layers=layers or None,
        images=images,
        rows=parse_ints(rows, "--rows", example="0,5,9") if rows is not None else None,
        scale=scale,
        data=data,
    )
    console.print(f"wrote {figure.save(out)}: {figure.summary()}", highlight=False, markup=False)
    if figure.dataset_note:
        line = f"  input images not shown: {figure.dataset_note}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for row, note in zip(figure.rows.tolist(), figure.notes, strict=True):
        if note:
            console.print(f"  row {row}: image not shown ({note})", highlight=False, markup=False)


app.add_typer(dataset_app, name="dataset")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
