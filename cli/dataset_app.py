"""``featcache dataset``: inspect datasets before extracting them (``describe``). Parse, call
the library, print."""

from __future__ import annotations

import typer

from cli._console import console, escape, reports_errors
from cli.extract_app import _DATA, Crop, Level, ShortClasses, _data_options

dataset_app = typer.Typer(help="Inspect datasets before extracting them.", no_args_is_help=True)


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
    test_fraction: float | None = _DATA["test_fraction"],
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
