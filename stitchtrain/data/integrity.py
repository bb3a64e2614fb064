"""What fit may read from a store, and the errors for stores it must not train on.

Before any training step, ``usable_rows`` decides the rows of a store pair (or of one store):
a row is usable when it is ``valid`` and its shard has a completion marker in every store. A
store with unmarked shards is refused (``IncompleteStoreError``) unless ``allow_incomplete``,
which keeps its marked shards and reports how many rows that leaves. While training reads, the
loader turns undecodable objects into ``UnreadableShardError`` and non-finite features in
selected rows into ``NonFiniteFeaturesError`` (``format_rows`` names the rows);
``UnreadableShardError`` is the store's own (``featcache.store``), as is ``ShardProofError``:
every read of a marked shard proves it against its marker first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.store import FeatureStore, StoreError, UnreadableShardError

__all__ = [
    "IncompleteStoreError",
    "UnreadableShardError",
    "NonFiniteFeaturesError",
    "StoreRows",
    "check_usable",
    "require_finite",
    "usable_rows",
    "format_rows",
]


class IncompleteStoreError(StoreError):
    """A store with shards that have no completion marker (extraction not finished)."""


class NonFiniteFeaturesError(StoreError, ValueError):
    """Features that are NaN or infinite in rows read as valid."""

    def __init__(self, store: FeatureStore, array: str, rows: np.ndarray):
        super().__init__(
            f"Expected finite features in every row read from store {store.url}. Got NaN or inf "
            f"in {array}, {format_rows(rows)} instead (marked valid). Run `featcache verify "
            f"{store.url}` and re-extract that store."
        )


def require_finite(store: FeatureStore, array: str, values: np.ndarray, rows: np.ndarray) -> None:
    """Raise ``NonFiniteFeaturesError`` unless every row of ``values`` (store rows ``rows``,
    one per leading index) is finite."""
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if not finite.all():
        raise NonFiniteFeaturesError(store, array, np.asarray(rows)[~finite])


def format_rows(rows, most: int = 10) -> str:
    """``rows 3, 5, 9`` (ascending store rows; the first ``most``, then the count)."""
    rows = [int(r) for r in np.unique(np.asarray(rows))]
    shown = ", ".join(map(str, rows[:most]))
    return f"rows {shown}" + (f", ... ({len(rows)} rows)" if len(rows) > most else "")


@dataclass(frozen=True)
class StoreRows:
    """The usable rows of one store: ``valid`` and inside a marked shard (ascending int64)."""

    store: FeatureStore
    rows: np.ndarray
    unmarked: list[int]  # shards without a completion marker

    def note(self, rows_used: int) -> dict[str, int | list[int]]:
        """What ``metrics.json`` records for an incomplete store fit used anyway."""
        return {
            "unmarked_shards": self.unmarked,
            "num_shards": self.store.num_shards,
            "rows_used": rows_used,
            "num_rows": self.store.num_images,
        }


def check_usable(store: FeatureStore, arrays: list[str], allow_incomplete: bool) -> StoreRows:
    """The rows of ``store`` that fit may read from ``arrays``; raise if it must not train on it.

    Raises ``IncompleteStoreError`` for unmarked shards unless ``allow_incomplete``, and
    ``StoreError`` when a marked shard's object of one of ``arrays`` is missing or has another
    size than its marker records (``FeatureStore.object_faults``: one listing per array, no
    data read; checksums are checked as the loader reads). Arrays the store lacks are left to
    ``pairing.check_pair``, which names them.
    """
    markers = store.valid_markers()  # read once: the shards checked are the rows used
    unmarked = [shard for shard in range(store.num_shards) if shard not in markers]
    faults = store.object_faults([name for name in arrays if name in store.group], markers)
    if faults:
        shown = "; ".join(faults[:3]) + (f"; ... ({len(faults)} faults)" if len(faults) > 3 else "")
        raise StoreError(
            f"Store {store.url} is damaged: {shown}. Run `featcache verify {store.url}` and "
            "re-extract that store."
        )
    rows = np.flatnonzero(store.marked_mask(markers) & np.asarray(store.read("valid"), bool))
    rows = rows.astype(np.int64)
    if unmarked and not allow_incomplete:
        listed = ", ".join(map(str, unmarked[:10])) + (", ..." if len(unmarked) > 10 else "")
        raise IncompleteStoreError(
            f"Store {store.url} is incomplete: {len(unmarked)} of {store.num_shards} shards have "
            f"no completion marker (shards {listed}), so only {len(rows)} of "
            f"{store.num_images} rows are usable. Re-run the extraction that wrote it to "
            "complete it (the same `featcache extract` command resumes), or pass "
            "--allow-incomplete to use the marked shards only."
        )
    return StoreRows(store, rows, unmarked)


def usable_rows(
    reads: list[tuple[FeatureStore, list[str]]], allow_incomplete: bool
) -> tuple[np.ndarray, dict[str, dict]]:
    """(rows usable in every store, ascending int64; {url: note} of the incomplete ones).

    ``reads`` pairs each store with the arrays that will be read from it; a store listed
    twice (a self-stitch) is checked once, for the union of its arrays.
    """
    stores: dict[str, FeatureStore] = {}
    arrays: dict[str, dict[str, None]] = {}  # ordered sets
    for store, names in reads:
        stores.setdefault(store.url, store)
        arrays.setdefault(store.url, {}).update(dict.fromkeys([*names, "valid"]))
    checked = [check_usable(stores[url], list(arrays[url]), allow_incomplete) for url in stores]
    rows = checked[0].rows
    for each in checked[1:]:
        rows = np.intersect1d(rows, each.rows)
    notes = {c.store.url: c.note(len(rows)) for c in checked if c.unmarked}
    return rows, notes
