"""``featcache``: list encoders and run the built-in demo. Parse, call the library, print."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from cli._console import console, reports_errors

app = typer.Typer(
    help="Run frozen vision foundation models once and cache their token features.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _main() -> None:
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


@app.command()
@reports_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Where the generated dataset goes."),
) -> None:
    """Generate the built-in dataset and run every tiny encoder on it."""
    import torch

    from featcache.demo_data import make_demo_dataset
    from featcache.encoders import PRESETS, load_encoder
    from featcache.images import decode_image

    console.print(models_table())
    manifest = make_demo_dataset(out / "data")
    console.print(f"dataset: [bold]{manifest}[/]")
    paths = sorted((out / "data" / "images").rglob("*.png"))[:8]
    images = [decode_image(p) for p in paths]
    table = Table(title=f"tiny encoders on {len(images)} demo images")
    for column in (
        "preset",
        "family",
        "layer 0",
        "layer N",
        "final",
        "pooled",
        "ms",
        "fingerprint",
    ):
        table.add_column(column)
    for name in [n for n, p in PRESETS.items() if p.tiny]:
        encoder = load_encoder(name)
        batch = torch.stack([encoder.preprocess(image) for image in images])  # (B, 3, H, W)
        start = time.perf_counter()
        with torch.inference_mode():
            first = encoder.run(batch, upto=0)
            last = encoder.run(batch)
            final, pooled = encoder.run_from(last, encoder.depth)
        elapsed = (time.perf_counter() - start) * 1e3
        table.add_row(
            name,
            encoder.family,
            str(tuple(first.shape)),
            str(tuple(last.shape)),
            str(tuple(final.shape)),
            str(tuple(pooled.shape)),
            f"{elapsed:.0f}",
            encoder.fingerprint[:12],
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
