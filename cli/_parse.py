"""Option values the commands take as text, parsed and checked before any work starts.

Each refusal is a ``FeatcacheError`` (printed as one line, exit status 2, by ``reports_errors``)
naming the option, the value given and what is accepted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from featcache.errors import FeatcacheError


def parse_ints(
    text: str, option: str, *, minimum: int = 0, example: str = "2,6,10", empty: bool = False
) -> tuple[int, ...]:
    """ "2,6,10" -> (2, 6, 10); refuses non-integers, values below ``minimum`` and (unless
    ``empty``) a list with no value."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = None
    if values is None or not (values or empty) or any(v < minimum for v in values):
        raise FeatcacheError(
            f"Expected {option} as comma-separated integers >= {minimum} such as {example}. "
            f"Got {text!r} instead."
        )
    return values


def parse_lrs(text: str) -> tuple[float, ...]:
    """ "1e-3,5e-3" -> (0.001, 0.005); every learning rate positive and finite."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise FeatcacheError(
            "Expected --lr as comma-separated positive numbers such as 1e-3,5e-3. "
            f"Got {text!r} instead."
        )
    return values


def parse_weights(items: list[str]) -> dict[str, str]:
    """["NAME=FILE", ...] -> {NAME: FILE}."""
    weights = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise FeatcacheError(f"Expected --weights NAME=FILE.safetensors. Got {item!r} instead.")
        weights[name] = path
    return weights


def check_dirs(paths: list[str] | None, option: str) -> None:
    """Refuse a path of ``option`` (a run dir) that is not a directory."""
    for path in paths or ():
        if not Path(path).is_dir():
            raise FeatcacheError(
                f"Expected {option} to name a run dir. Got {path}, which is not a directory."
            )


def check_size(text: str | None, option: str = "--memory-budget") -> None:
    """Refuse what ``stitchtrain.data.sizes.parse_size`` (``dask.utils.parse_bytes``) cannot read
    (None: the default). Imports dask, never torch, and only when a size is given."""
    from stitchtrain.data.sizes import parse_size

    if text is None:
        return
    try:
        parse_size(text)
    except ValueError:
        raise FeatcacheError(
            f"Expected {option} as a size such as 512MB, 8GB, 2GiB or a number of bytes. "
            f"Got {text!r} instead."
        ) from None


def check_device(text: str) -> None:
    """auto, cpu, cuda or cuda:N (and CUDA only where there is CUDA).

    Only cuda / cuda:N import torch (to ask for CUDA); a malformed value is refused without it,
    by ``featcache.devices.check_device_name``."""
    from featcache.devices import check_device_name

    check_device_name(text)
    if text in ("auto", "cpu"):
        return
    from featcache.extract import resolve_device

    resolve_device(text)


def check_scheduler(text: str | None, *, sequential: bool = False) -> None:
    """local, local:N (N >= 1) or a scheduler address such as tcp://HOST:PORT; ``sequential``
    also accepts "sequential" (in this process)."""
    kind, _, workers = (text or "").partition(":")
    if (
        text is None
        or text == "local"
        or (kind == "local" and workers.isdigit() and int(workers) >= 1)
        or "://" in text
        or (sequential and text == "sequential")
    ):
        return
    accepted = "sequential, local, local:N" if sequential else "local, local:N"
    raise FeatcacheError(
        f"Expected --scheduler {accepted} (N >= 1) or tcp://HOST:PORT. Got {text!r} instead."
    )


def check_out_dir(path: object, option: str = "--out") -> None:
    """An output directory may be new or a directory, never an existing regular file."""
    text = str(path)
    if "://" not in text and os.path.isfile(text):
        raise FeatcacheError(
            f"Expected {option} to be a directory (or a new path). Got the file {text} instead."
        )


def at_least(minimum: int):
    """A typer callback refusing integers below ``minimum``, naming the value given (typer's
    own ``min=`` names only the bound). ``check`` takes ``value`` (int or None) unannotated:
    typer reads every callback's type hints to build each command, and a callback without
    them costs it nothing at start-up."""
    import typer

    def check(value):
        if value is not None and value < minimum:
            raise typer.BadParameter(f"Expected an integer >= {minimum}. Got {value} instead.")
        return value

    return check
