"""The store's errors: a store that cannot be used, a store made with other settings, and a
marked shard whose objects do not read back as its marker says."""

from __future__ import annotations

from featcache.errors import FeatcacheError

__all__ = ["StoreError", "StoreMismatchError", "ShardProofError", "UnreadableShardError"]


class StoreError(FeatcacheError, OSError):
    """A store that is missing, unreadable, damaged, or not a featcache store."""


class StoreMismatchError(StoreError):
    """An existing store was made with a different encoder, dataset or settings."""


class ShardProofError(StoreError, ValueError):
    """A marked shard's object that its marker does not vouch for: missing, of another size, or
    of another digest (corrupted, swapped, copied from another store, or an edited marker)."""

    def __init__(self, url: str, array: str, shard: int, rows: tuple[int, int], fault: str):
        super().__init__(
            f"Store {url}: {array}, shard {shard} (rows {rows[0]}..{rows[1] - 1}) is not what "
            f"its completion marker records: {fault}. Run `featcache verify {url}` and "
            "re-extract that store."
        )


class UnreadableShardError(StoreError, ValueError):
    """A shard object that fails to decode (a Crc32c mismatch, a truncated object)."""

    def __init__(
        self, url: str, array: str, shard: int, rows: tuple[int, int], cause: BaseException
    ):
        reason = " ".join(f"{type(cause).__name__}: {cause}".split()).rstrip(".")  # one line
        super().__init__(
            f"Cannot read {array} of store {url}, shard {shard} (rows {rows[0]}..{rows[1] - 1})"
            f": {reason}. Run `featcache verify {url}` and re-extract that store."
        )
