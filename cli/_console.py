"""What both command-line apps share: the rich consoles, error reporting, ``--version``.

Start-up is kept near the cost of importing typer and rich (benchmarks/cli_startup.py):

- ``console`` and ``err_console`` are made on first use. Importing ``rich.console`` costs about
  a third of a bare ``import typer, rich``, and ``--help``, ``--version`` and parse errors never
  print through them.
- ``RICH_MARKUP_MODE`` is None: typer prints click's plain help and usage errors. Its rich help
  imports ``typer.rich_utils`` (rich's markdown, syntax and traceback modules), which alone
  costs more than ``import typer, rich``.

Both consoles read no rich markup (``markup=False``): text from users and libraries (paths,
model names, error messages, table cells and titles) prints as written, brackets included
("[stores]", "['position']"). The few styled lines ask for markup (``markup=True``) and pass
what they interpolate through ``escape``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

from featcache.errors import FeatcacheError, Interrupted

__all__ = [
    "RICH_MARKUP_MODE",
    "console",
    "err_console",
    "escape",
    "print_version",
    "version_option",
    "reports_errors",
]

RICH_MARKUP_MODE = None  # typer.Typer(rich_markup_mode=...): plain help, see the docstring


class _LazyConsole:
    """A ``rich.console.Console`` (no markup) built on first attribute access; every attribute
    (``print``, ``status``, ``width``, ...) and ``with`` are the console's. Wide tables stay
    readable when piped to a file or a CI log (rich assumes 80 columns there): 160 columns when
    not a terminal."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console = None

    def _get(self):
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            width = None if stream.isatty() else 160
            self._console = Console(stderr=self._stderr, width=width, markup=False)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __enter__(self) -> Any:  # ``with console:`` (rich's Live does it): the console's own
        return self._get().__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        self._get().__exit__(*exc_info)


console = _LazyConsole(stderr=False)
err_console = _LazyConsole(stderr=True)


def escape(text: object) -> str:
    """``rich.markup.escape(str(text))``: user or library text printed as written."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def print_version(value: bool) -> None:
    """``--version``: print the package version and exit (an eager typer option callback)."""
    if value:
        from featcache import __version__

        typer.echo(__version__)
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
    """Turn the library's deliberate errors into a red one-line message and exit status 2, or
    the error's own ``exit_code``; a stop on a signal (``Interrupted``: exit status 130 for
    Ctrl-C, 143 for SIGTERM) is no error and prints its message alone, in yellow. The message
    is escaped: its brackets print as written."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FeatcacheError as err:
            message = f"[bold red]error:[/] {escape(err)}"
            if isinstance(err, Interrupted):
                message = f"[bold yellow]{escape(err)}[/]"
            err_console.print(message, markup=True, soft_wrap=True, highlight=False)
            raise typer.Exit(code=getattr(err, "exit_code", 2)) from err

    return wrapper
