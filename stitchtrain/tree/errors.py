"""``TreeError``: the error of a tree that cannot be built or loaded."""

from __future__ import annotations

from featcache.errors import FeatcacheError

__all__ = ["TreeError"]


class TreeError(FeatcacheError, ValueError):
    """A tree that cannot be built or loaded: mismatched fingerprints, positions or files."""
