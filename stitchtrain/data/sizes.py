"""Memory sizes given as text (``--memory-budget``), read by ``dask.utils.parse_bytes``.

"512MB", "1.5G", "800k" count in powers of 1000, "2GiB" / "10 KiB" in powers of 1024, a bare
number is bytes; case and spaces do not matter. On top of dask's reading, a size must name a
number (dask reads "" and "kB" as 1 and 1000 bytes) and must not be negative. dask is imported
on the first call (importing it costs more than the CLI's whole ``--help``), and never torch,
so the CLI checks sizes at parse time.
"""

from __future__ import annotations

__all__ = ["parse_size", "format_size"]


def parse_size(text: str) -> int:
    """ "512MB" -> 512_000_000, "2GiB" -> 2 * 1024**3, "4096" -> 4096; ``ValueError`` naming
    the text and the accepted forms otherwise."""
    from dask.utils import parse_bytes

    text = str(text)
    try:
        if not any(char.isdigit() for char in text):
            raise ValueError("no number")
        size = parse_bytes(text)
        if size < 0:
            raise ValueError("negative")
    except ValueError:
        raise ValueError(
            f"Expected a size such as 512MB, 2GiB, 1.5G, 800k or a number of bytes. "
            f"Got {text!r} instead."
        ) from None
    return size


def format_size(nbytes: float) -> str:
    """``dask.utils.format_bytes``, powers of 1024: 9646899 -> "9.20 MiB" (dask imported here,
    when a size is printed)."""
    from dask.utils import format_bytes

    return format_bytes(int(nbytes))
