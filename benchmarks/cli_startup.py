"""CLI start-up wall time ÷ ``python -c "import typer, rich"`` (goal <= 1.5 for both ``--help``).

Each command runs in a fresh interpreter, as the console scripts run it (``from
cli.featcache_app import main; main()``, argv set), side by side in one run:

  typer + rich          ``python -c "import typer, rich"``: the floor any typer + rich CLI pays
  typer + rich + dask.utils   what importing dask.utils (sizes: parse_bytes, format_bytes) adds
  featcache --help      the top-level help
  stitchtrain --help    the top-level help (with the tree and experiments sub-apps)
  featcache --version   the version option
  featcache models      the preset table (architectures stated by the presets: no torch)
  stitchtrain positions dinov2-l siglip2-l   the same for a pair
  featcache ls EMPTY    a store command on an empty folder
  featcache extract --dtype int8 ...   a parse error (a bad option value)
  stitchtrain fit --memory-budget lots ...   a parse error read by dask.utils.parse_bytes

Wall time is the whole subprocess: interpreter start, imports, the command, exit, as an
installed CLI starts from its second run on: Python's bytecode cache is on for every module
(in a temporary ``PYTHONPYCACHEPREFIX``, so nothing is written into the checkout, and whatever
``PYTHONDONTWRITEBYTECODE`` says) and warmed by one untimed run of each command. Each command
is repeated ``--repeats`` times, alternating; each keeps its fastest repeat (other processes only
add time), and ratio = fastest command ÷ fastest ``typer + rich``. Before timing, each command
is run once more to report whether torch ended up in ``sys.modules``.

``--baseline DIR`` also times the same commands from another checkout (``DIR`` first on
``PYTHONPATH``), in the same repeats, for a before/after claim:
``mkdir /tmp/before && git archive HEAD | tar -x -C /tmp/before``, then
``--baseline /tmp/before``.

    .venv/bin/python benchmarks/cli_startup.py                 # ~30 s on 2 cores
    .venv/bin/python benchmarks/cli_startup.py --repeats 5 --json
    .venv/bin/python benchmarks/cli_startup.py --goal-only --repeats 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py: scripts run as files, their folder is on sys.path
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
FLOOR = "typer + rich"
GOALS = ("featcache --help", "stitchtrain --help")

# Runs an app as its console script does; with ``report``, prints whether torch got imported.
_APP = "import sys\n{report}from cli.{module} import main\nsys.argv = {argv!r}\nmain()\n"
_REPORT = (
    "import atexit\n"
    "atexit.register(lambda: print('TORCH=' + str('torch' in sys.modules), file=sys.stderr))\n"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--baseline", default=None, help="another checkout to time the same commands from"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--goal-only",
        action="store_true",
        help="time only typer + rich and the two --help (more repeats fit in a quiet moment)",
    )
    return parser.parse_args(argv)


def commands(empty: str) -> dict[str, tuple[str, list[str]] | str | None]:
    """name -> (cli module, argv) of each timed command; a string: Python code to time; None:
    the typer + rich floor."""
    fit = ["stitchtrain", "fit", "--source", "a", "--target", "b", "--position", "2"]
    return {
        FLOOR: None,
        "typer + rich + dask.utils": "import typer, rich, dask.utils",
        "featcache --help": ("featcache_app", ["featcache", "--help"]),
        "stitchtrain --help": ("stitchtrain_app", ["stitchtrain", "--help"]),
        "featcache --version": ("featcache_app", ["featcache", "--version"]),
        "featcache models": ("featcache_app", ["featcache", "models"]),
        "stitchtrain positions dinov2-l siglip2-l": (
            "stitchtrain_app",
            ["stitchtrain", "positions", "dinov2-l", "siglip2-l"],
        ),
        "featcache ls EMPTY": ("featcache_app", ["featcache", "ls", empty]),
        "stitchtrain fit --memory-budget lots": (
            "stitchtrain_app",
            [*fit, "--out", empty, "--memory-budget", "lots"],
        ),
        "featcache extract --dtype int8": (
            "featcache_app",
            [
                "featcache",
                "extract",
                "--model",
                "x",
                "--data",
                "y",
                "--out",
                "z",
                "--dtype",
                "int8",
            ],
        ),
    }


def code_of(command: tuple[str, list[str]] | str | None, report: bool = False) -> str:
    if command is None:
        return "import typer, rich"
    if isinstance(command, str):
        return command
    module, argv = command
    return _APP.format(report=_REPORT if report else "", module=module, argv=argv)


def run_once(code: str, checkout: Path, pycache: str) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]),
        PYTHONPYCACHEPREFIX=pycache,
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True
    )
    return time.perf_counter() - started, done


def imports_torch(
    command: tuple[str, list[str]] | str | None, checkout: Path, pycache: str
) -> bool | None:
    if command is None or isinstance(command, str):
        return None
    _, done = run_once(code_of(command, report=True), checkout, pycache)
    lines = [line for line in done.stderr.splitlines() if line.startswith("TORCH=")]
    if not lines:
        raise RuntimeError(f"{command}: no report; stderr={done.stderr!r}")
    return lines[-1] == "TORCH=True"


def measure(args: argparse.Namespace) -> dict:
    empty = tempfile.mkdtemp(prefix="featcache-bench-empty-")
    checkouts = {"now": REPO}
    if args.baseline:
        checkouts["baseline"] = Path(args.baseline).resolve()
    named = commands(empty)
    if args.goal_only:
        named = {name: named[name] for name in (FLOOR, *GOALS)}
    runs = [(side, name) for side in checkouts for name in named]
    pycache = tempfile.mkdtemp(prefix="featcache-bench-pycache-")
    torch_loaded = {run: imports_torch(named[run[1]], checkouts[run[0]], pycache) for run in runs}
    for side, name in runs:  # warm-up: every module's bytecode cached
        run_once(code_of(named[name]), checkouts[side], pycache)
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for _ in range(args.repeats):
        for side, name in runs:
            seconds, _ = run_once(code_of(named[name]), checkouts[side], pycache)
            times[(side, name)].append(seconds)
    shutil.rmtree(pycache)
    os.rmdir(empty)
    floor = min(min(times[(side, FLOOR)]) for side in checkouts)  # one floor for both sides
    rows = [
        {
            "checkout": side,
            "command": name,
            "seconds": min(times[(side, name)]),
            "ratio_to_typer_rich": min(times[(side, name)]) / floor,
            "imports_torch": torch_loaded[(side, name)],
            "all_seconds": times[(side, name)],
        }
        for side, name in runs
    ]
    now = {row["command"]: row for row in rows if row["checkout"] == "now"}
    return {
        "benchmark": "cli_startup",
        "goal": "featcache --help and stitchtrain --help wall time / typer+rich import <= 1.5",
        "goal_met": all(now[name]["ratio_to_typer_rich"] <= 1.5 for name in GOALS),
        "floor_seconds": floor,
        "repeats": args.repeats,
        "baseline": args.baseline,
        "python": sys.executable,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "rows": rows,
    }


def print_tables(result: dict) -> None:
    console = Console()
    console.print(
        f"fresh interpreter per run, fastest of {result['repeats']}, {result['cpu_count']} CPU "
        f"cores, load average {result['load_average_1min']:.2f}; typer + rich floor "
        f"{result['floor_seconds'] * 1000:.0f} ms"
    )
    table = Table(title="CLI start-up (goal: --help ÷ typer + rich <= 1.5)")
    columns = ["command", "ms", "÷ typer + rich", "imports torch"]
    if result["baseline"]:
        columns.insert(0, "checkout")
    for column in columns:
        table.add_column(column, justify="left" if column in ("command", "checkout") else "right")
    for row in result["rows"]:
        cells = [
            row["command"],
            f"{row['seconds'] * 1000:.0f}",
            f"{row['ratio_to_typer_rich']:.2f}",
            "-" if row["imports_torch"] is None else ("yes" if row["imports_torch"] else "no"),
        ]
        if result["baseline"]:
            cells.insert(0, row["checkout"])
        table.add_row(*cells)
    console.print(table)
    console.print(f"goal met: {'yes' if result['goal_met'] else 'no'}")


def main(argv: list[str] | None = None) -> None:
    _cli.run(parse_args, measure, print_tables, argv)


if __name__ == "__main__":
    main()
