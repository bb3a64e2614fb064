"""The hybrid's error: a run dir or export folder that cannot become an encoder."""

from __future__ import annotations

from featcache.errors import FeatcacheError

__all__ = ["HybridError"]


class HybridError(FeatcacheError, ValueError):
    """An unfinished, self-stitch or probe-only run, a missing stage or parent, a file whose
    digest differs from the recorded one, a stitch that does not fit its parents."""
