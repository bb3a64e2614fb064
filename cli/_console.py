"""What both command-line apps share: one rich console and error reporting."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console

from featcache.errors import FeatcacheError

# Wide tables stay readable when piped to a file or a CI log (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def print_version(value: bool) -> None:
    """``--version``: print the package version and exit (an eager typer option callback)."""
    if value:
        from featcache import __version__

        console.print(__version__, highlight=False)
        raise typer.Exit()


def version_option() -> Any:
    """The ``--version`` option both apps' callbacks take."""
    return typer.Option(
        None,
        "--version",
        callback=print_version,
        is_eager=True,
        help="Print the version and exit.",
    )


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's deliberate errors into a red one-line message and exit status 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FeatcacheError as err:
            err_console.print(f"[bold red]error:[/] {err}", soft_wrap=True, highlight=False)
            raise typer.Exit(code=2) from err

    return wrapper
