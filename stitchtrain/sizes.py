"""``parse_size``: memory sizes given as text. Torch-free, so the CLI checks them at parse time."""

from __future__ import annotations

import re

__all__ = ["parse_size"]

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(i?))?b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """ "512MB", "1.5G", "800k" (powers of 1000), "2GiB" (powers of 1024), "4096" -> bytes."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(
            f"Expected a size such as 512MB, 2GiB, 1.5G, 800k or a number of bytes. "
            f"Got {text!r} instead."
        )
    number, prefix, binary = match.groups()
    power = "kmgtp".index(prefix.lower()) + 1 if prefix else 0
    return round(float(number) * (1024 if binary else 1000) ** power)
