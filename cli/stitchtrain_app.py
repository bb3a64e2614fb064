"""``stitchtrain``: plan and (in later releases) fit stitch layers between two encoders."""

from __future__ import annotations

import typer
from rich.table import Table

from cli._console import console, reports_errors

app = typer.Typer(
    help="Train stitch layers between vision foundation models from cached features.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _main() -> None:
    """Commands are listed below; each has --help."""


@app.command()
@reports_errors
def positions(
    source: str = typer.Argument(..., help="Source encoder (preset or library name)."),
    target: str = typer.Argument(..., help="Target encoder (preset or library name)."),
) -> None:
    """Show where SOURCE can be stitched into TARGET and what the stitch must map.

    Position n runs source blocks 1..n, the stitch, then target blocks n+1..N, so n ranges
    over 1..min(N_source, N_target - 1) (n = N_target would leave no target block to run).
    """
    from featcache.encoders import PRESETS, describe_preset, load_encoder

    def facts(name: str) -> dict:
        if name in PRESETS:
            return describe_preset(name)
        encoder = load_encoder(name, random_init=True, device="meta")
        return {
            "depth": encoder.depth,
            "width": encoder.width,
            "prefix": encoder.layout.prefix,
            "grid": encoder.grid,
        }

    src, tgt = facts(source), facts(target)
    table = Table(title=f"{source} -> {target}")
    table.add_column("")
    table.add_column("source")
    table.add_column("target")
    for key in ("depth", "width", "prefix", "grid"):
        table.add_row(key, str(src[key]), str(tgt[key]))
    console.print(table)
    last = min(src["depth"], tgt["depth"] - 1)
    console.print(f"stitch positions: 1..{last}")
    console.print(f"stitch maps D={src['width']} -> D={tgt['width']} per token")
    if tuple(src["grid"]) != tuple(tgt["grid"]):
        console.print(f"patch grid resampled {src['grid']} -> {tgt['grid']} (bilinear)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
