"""The store's errors: a store that cannot be used, and a store made with other settings."""

from __future__ import annotations

from featcache.errors import FeatcacheError


class StoreError(FeatcacheError, OSError):
    """A store that is missing, unreadable, damaged, or not a featcache store."""


class StoreMismatchError(StoreError):
    """An existing store was made with a different encoder, dataset or settings."""
