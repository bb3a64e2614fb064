"""``stitchtrain tree``: build a VFM Stitch Tree from run dirs, and measure what it saves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer

if TYPE_CHECKING:
    from rich.table import Table

from cli._console import console, err_console, reports_errors
from cli._parse import at_least, check_device, check_out_dir, parse_ints, parse_weights
from featcache.errors import FeatcacheError

Precision = Literal["fp32", "bf16", "amp-bf16"]  # stitchtrain.tree.bench_config.PRECISIONS
Stitch = Literal["linear", "mlp", "lora"]  # stitchtrain.model.stitches.STITCH_KINDS

tree_app = typer.Typer(
    help="VFM Stitch Tree: share early trunk blocks across several encoders (paper section 6).",
    no_args_is_help=True,
    add_completion=False,
)


def _readout_option(what: str, default: str, extra: str = ""):
    return typer.Option(
        None,
        "--readout-layer",
        callback=at_least(2),
        help=f"R: {what} read at layer R: branches run blocks n+1..R and nothing after block R "
        f"runs (no final norm or pool).{extra} Default: {default}. MLLMs read the penultimate "
        "layer, 23 of a 24-block ViT-L (the paper's L = 23) (>= 2, above every position n).",
    )


def _parse_branch(item: str) -> str | tuple[str, str]:
    """``RUN_DIR`` or ``NAME=RUN_DIR`` (a path that exists as given is never split)."""
    name, sep, path = item.partition("=")
    if sep and name and path and not Path(item).exists():
        return name, path
    return item


@tree_app.command()
@reports_errors
def build(
    trunk: str = typer.Option(..., help="Trunk encoder (preset, timm:..., open_clip:...)."),
    position: int = typer.Option(
        ..., callback=at_least(1), help="n: trunk blocks 1..n are shared by every branch (>= 1)."
    ),
    branch: list[str] = typer.Option(
        ..., help="A finished fit run dir, or NAME=RUN_DIR to name the branch (repeatable)."
    ),
    out: Path = typer.Option(..., help="Tree dir to write (tree.json + stitch safetensors)."),
    readout_layer: int | None = _readout_option(
        "every output of the tree is", "N, the final output (normed tokens, pooled)"
    ),
    weights: list[str] = typer.Option([], help="NAME=FILE.safetensors for an encoder."),
    random_init: bool = typer.Option(False, "--random-init", help="Random-init encoders."),
    device: str = typer.Option(
        "cpu", help="Where to load the encoders to check them: auto, cpu, cuda or cuda:N."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing tree."),
    allow_geometry_mismatch: bool = typer.Option(
        False, "--allow-geometry-mismatch", help="Accept runs whose stores see other pixels."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print tree.json instead of a table."),
) -> None:
    """Build a tree from run dirs whose source is the trunk encoder at --position, and save it.

    Every run's source store must come from the trunk (same fingerprint) and every branch
    encoder must match its run's target store; each output of the tree then equals the
    stitched model of its run dir, and the trunk's output equals the trunk's own forward (cut at
    --readout-layer, recorded in tree.json, when given).
    """
    from rich.table import Table

    from featcache.extract import resolve_device
    from stitchtrain.tree.model import VFMStitchTree, check_readout_layer
    from stitchtrain.tree.runs import load_trunk, resolve_runs
    from stitchtrain.tree.saved import check_tree_dir

    check_out_dir(out)
    if readout_layer is not None:  # before any run dir or encoder is read
        check_readout_layer(readout_layer, position, what="--readout-layer")
    check_tree_dir(out, overwrite=overwrite)
    runs = [_parse_branch(item) for item in branch]
    named_weights = parse_weights(weights)
    for name, path in named_weights.items():
        if "://" not in path and not Path(path).is_file():
            raise FeatcacheError(f"No weights file {path} (--weights {name}=FILE).")
    target_device = resolve_device(device)
    # every run dir, store, geometry and stitch file before the first encoder loads
    resolved = resolve_runs(position, runs, allow_geometry_mismatch=allow_geometry_mismatch)
    if readout_layer is not None:
        depths = [r.source.attrs["encoder"]["depth"] for r in resolved]
        depths += [r.target.attrs["encoder"]["depth"] for r in resolved]
        check_readout_layer(readout_layer, position, min(depths), what="--readout-layer")
    trunk_encoder = load_trunk(
        trunk,
        runs,
        weights=named_weights.get(trunk),
        random_init=random_init,
        device=target_device,
    )
    tree = VFMStitchTree.from_runs(
        trunk_encoder,
        position,
        runs,
        weights=named_weights,
        random_init=random_init,
        device=target_device,
        readout_layer=readout_layer,
        allow_geometry_mismatch=allow_geometry_mismatch,
    )
    tree.save(out, overwrite=overwrite)
    described = tree.describe()
    if as_json:
        print(json.dumps(described, indent=2))
        return
    read = "final output" if tree.reads_final else f"layer {tree.readout_layer} tokens"
    title = f"VFM Stitch Tree: {trunk} blocks 1..{position} shared, read at {read}"
    table = Table(title=title)
    for column in ("output", "encoder", "stitch", "blocks run", "fingerprint", "from"):
        table.add_column(column)
    trunk_info = described["trunk"]
    table.add_row(
        described["trunk_name"],
        trunk_info["name"],
        "-",
        f"1..{tree.layers_read(tree.trunk)}",
        trunk_info["fingerprint"],
        "trunk",
    )
    for entry, tree_branch in zip(described["branches"], tree.branches, strict=True):
        encoder = entry["encoder"]
        first = position if entry["stitch"]["kind"] == "lora" else position + 1
        table.add_row(
            entry["name"],
            encoder["name"],
            entry["stitch"]["kind"],
            f"{first}..{tree.layers_read(tree_branch.encoder)}",
            encoder["fingerprint"],
            entry["provenance"].get("run_dir", ""),
        )
    console.print(table)
    console.print(f"tree dir: {out}")


def _systems_table(result: dict) -> Table:
    from rich.table import Table

    table = Table(title=f"Table 5 (ours): {result['device_name']}, {result['precision']}")
    table.add_column("method")
    table.add_column("Param (M)", justify="right")
    table.add_column("GFLOPs", justify="right")
    for batch in result["batch_sizes"]:
        table.add_column(f"Lat. (ms) B={batch}, median (IQR)", justify="right")
    for batch in result["batch_sizes"]:
        table.add_column(f"Mem (MB) B={batch}", justify="right")
    for system in result["systems"]:
        by_batch = system["by_batch"]
        table.add_row(
            system["system"],
            f"{system['params_m']:.1f}",
            f"{system['gflops']:.2f}",
            *[_latency_cell(by_batch[str(b)]) for b in result["batch_sizes"]],
            *[f"{by_batch[str(b)]['memory_mb']:.0f}" for b in result["batch_sizes"]],
        )
    return table


def _latency_cell(measured: dict) -> str:
    """ "12.34 (0.56)": median latency and its interquartile range, ms (tree.measure._latency)."""
    return f"{measured['latency_ms']:.2f} ({measured['latency_iqr_ms']:.2f})"


def _cost_table(result: dict) -> Table:
    from rich.table import Table

    rows = result["cost"]
    layer = result["readout_layer"]
    read = f"layer L = {layer}" if layer is not None else "each encoder's depth N"
    title = f"Table 13 (ours): extra computation over one encoder, read at {read}"
    table = Table(title=title)
    columns = ["system", "blocks run", "formula", "blocks", "block FLOPs", "all FLOPs", "stitches",
               "stitch params", "stitch GFLOPs"]  # fmt: skip
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        cells = [
            row["system"],
            str(row["blocks_run"]),
            f"{row['formula']:.1%}",
            f"{row['blocks_extra']:.1%}",
            f"{row['block_flops_extra']:.1%}",
            f"{row['total_flops_extra']:.1%}",
            f"{row['stitch_share']:.1%}",
            f"{row['stitch_params']:,} ({row['stitches']})",
            f"{row['stitch_gflops']:.4g}",
        ]
        table.add_row(*cells)
    return table


@tree_app.command()
@reports_errors
def bench(
    tree_dir: str | None = typer.Argument(None, help="A saved tree (or use --encoder)."),
    encoder: list[str] = typer.Option([], help="Encoder names, trunk first (repeatable)."),
    positions: str = typer.Option(
        "", help="Stitch positions n >= 1, e.g. 6,14,22 (default: the tree's)."
    ),
    batch_sizes: str = typer.Option("1,32", help="Batch sizes (>= 1) to time."),
    warmup: int = typer.Option(
        3, callback=at_least(0), help="Untimed forwards before timing (>= 0)."
    ),
    repeats: int = typer.Option(
        10,
        callback=at_least(1),
        help="About this many timed forwards (forwards under 50 ms: this many x 50 ms of them), "
        "by torch.utils.benchmark.Timer; the median and interquartile range are reported (>= 1).",
    ),
    precision: Precision = typer.Option("fp32", help="bf16: bf16 weights; amp-bf16: autocast."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    stitch: Stitch = typer.Option("mlp", help="Random stitch kind in --encoder mode."),
    weights: list[str] = typer.Option([], help="NAME=FILE.safetensors for an encoder."),
    random_init: bool = typer.Option(False, "--random-init", help="Random-init encoders."),
    readout_layer: int | None = _readout_option(
        "every system (naive and VST-n) is",
        "the tree dir's own, else N",
        " Blocks, FLOPs and the formula (k-1)(L-n)/L of the cost table use L = R.",
    ),
    formula_depth: int | None = typer.Option(
        None, callback=at_least(2), hidden=True, help="Old name of --readout-layer."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Naive multi-encoder system vs VST-n: parameters, GFLOPs, latency, peak memory (paper
    Table 5), and the additional-cost table (Table 13) counted from the systems, every system
    read at --readout-layer (default: a tree dir's own, else N)."""
    from cli._progress import progress_display

    check_device(device)
    from stitchtrain.tree.bench import run_bench  # torch: after the checks
    from stitchtrain.tree.bench_config import BenchConfig

    if formula_depth is not None:  # the old name: L of the formula is now the readout layer
        if readout_layer not in (None, formula_depth):
            raise FeatcacheError(
                "Expected --readout-layer alone (--formula-depth is its old name). "
                f"Got --readout-layer {readout_layer} and --formula-depth {formula_depth} instead."
            )
        readout_layer = formula_depth
    config = BenchConfig(
        encoders=list(encoder),
        tree=tree_dir,
        positions=parse_ints(positions, "--positions", minimum=1, example="6,14", empty=True),
        batch_sizes=parse_ints(batch_sizes, "--batch-sizes", minimum=1, example="1,32"),
        warmup=warmup,
        repeats=repeats,
        device=device,
        precision=precision,
        stitch=stitch,
        weights=parse_weights(weights),
        random_init=random_init,
        readout_layer=readout_layer,
    )

    # a spinner while the encoders load, then (system, batch size) measurements k of N
    with progress_display(err_console if as_json else console) as display:
        loading = display.task("loading encoders, building the systems", None)
        bench: dict = {}  # the measurements' task, and the last measured line for its note

        def log(line: str) -> None:
            if "task" in bench:
                bench["line"] = line
            else:
                display.log(line)

        def progress(step: str, done: int, total: int) -> None:
            if "task" not in bench:
                loading.finish()
                bench["task"] = display.task("tree bench", total, unit="measurement")
            if done > bench["task"].completed:
                bench["task"].advance(done - bench["task"].completed, note=bench.pop("line", step))

        with loading:
            result = run_bench(config, log, progress)
        if "task" in bench:
            bench["task"].finish()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(_systems_table(result))
    console.print(_cost_table(result))
    console.print(f"memory: {result['memory_method']}", highlight=False)
    console.print(f"FLOPs: {result['flops_method']}", highlight=False)
