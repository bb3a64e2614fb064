"""Which layers an extraction stores: ``--layers`` as typed, resolved per encoder by its depth N.

- ``n`` (0 <= n <= N): layer n (layer 0: the tokens entering block 1; layer n: block n's
  output);
- ``-k`` (1 <= k <= N): counted from the last block, as timm's block indices are: -1 is layer
  N (the last block's output), -N is layer 1;
- ``all``: every layer 0..N;
- no ``--layers`` (``"default"``): the paper's layers for its 24-block models, 2,6,10,14,18,22,24,
  taken as fractions of the depth: layer ``max(1, round(k * N / 24))`` (halves rounded up) for
  each k, repeats dropped. 24 blocks: 2,6,10,14,18,22,24; 12 blocks: 1,3,5,7,9,11,12;
  6 blocks: 1..6.

Integers and negative indices mix (``2,6,-1``); ``all`` and the default stand alone. Each model
of a run resolves the request by its own depth, so models of different depths store different
layers unless the layers are given as non-negative numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from featcache.errors import FeatcacheError

__all__ = ["PAPER_LAYERS", "default_layers", "parse_layers", "resolve_layers"]

PAPER_LAYERS = (2, 6, 10, 14, 18, 22, 24)  # the default for the paper's 24-block encoders
_PAPER_DEPTH = 24


def default_layers(depth: int) -> tuple[int, ...]:
    """The layers stored when ``--layers`` is not given (module docstring): ``PAPER_LAYERS``
    as fractions of ``depth``."""
    layers = (max(1, math.floor(k * depth / _PAPER_DEPTH + 0.5)) for k in PAPER_LAYERS)
    return tuple(sorted(set(layers)))


def parse_layers(text: str) -> tuple[int, ...] | str:
    """ "2,6,-1" -> (2, 6, -1); "all" -> "all"; "" -> () (only ``--tokens pooled`` stores no
    layer; ``ExtractConfig`` checks that). Anything else is refused, saying what is accepted."""
    words = [part.strip() for part in text.split(",")]
    if text.strip().lower() == "all":
        return "all"
    if text.strip() == "":
        return ()
    try:
        if "" in words:
            raise ValueError(text)
        return tuple(int(word) for word in words)
    except ValueError:
        raise FeatcacheError(
            "Expected --layers as comma-separated layer numbers (0..depth, or -1 for the last "
            f"block, -2 for the one before), such as 2,6,-1, or all. Got {text!r} instead."
        ) from None


def resolve_layers(request: Sequence[int] | str, depth: int, name: str) -> tuple[int, ...]:
    """The sorted layers ``request`` (``ExtractConfig.layers``: "default", "all", a
    ``--layers`` text or integers) names for an encoder of ``depth`` blocks called ``name``.
    A layer outside 0..depth (or -depth..-1) is refused, naming what was typed."""
    if isinstance(request, str) and request == "default":
        return default_layers(depth)
    layers = parse_layers(request) if isinstance(request, str) else tuple(request)
    if layers == "all":
        return tuple(range(depth + 1))
    bad = [n for n in layers if not -depth <= n <= depth]
    if bad:
        typed = request if isinstance(request, str) else ",".join(map(str, request))
        raise FeatcacheError(
            f"Expected --layers in 0..{depth} or -{depth}..-1 (-1: the last block), or all, "
            f"for {name} (depth {depth}). Got {', '.join(map(str, bad))} in --layers "
            f"{typed!r} instead."
        )
    return tuple(sorted({n if n >= 0 else depth + 1 + n for n in layers}))
