"""Minibatches of cached features for the stitch trainers (docs/design.md).

A :class:`FeatureLoader` picks one of two modes from a memory budget:

* staged: the selected rows of every field are read once (one contiguous read per shard and
  field, shards in order) into memory: onto the device when it is CUDA, else host RAM (pinned
  when CUDA is available). Each epoch is a seeded permutation sliced into batches there.
* streamed: a reader thread reads shards (all fields) in a seeded random shard order, up to
  ``prefetch`` shards ahead; the rows of ``shuffle_window`` shards at a time (plus the previous
  window's remainder) are shuffled and cut into batches, so only an epoch's last batch is short.

Batches are ``dict[str, torch.Tensor]`` on the loader's device: features float32, (B, T, D)
for token arrays ("layers/<n>", "final") and (B, D) for "pooled"; integer arrays int64 (labels
(B,), masks (B, H, W)); "valid" bool; with ``return_rows`` also "rows" (B,) int64 store rows.

Every read is checked as it arrives (staged: once, while staging; streamed: each shard read):
an object that does not decode raises ``integrity.UnreadableShardError``, NaN or inf in a
selected row of a feature array raises ``integrity.NonFiniteFeaturesError``; both name the
store, the array and the rows, so callers select valid rows (``valid_rows``).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from featcache.store import FeatureStore
from stitchtrain.integrity import UnreadableShardError, require_finite
from stitchtrain.sizes import parse_size  # re-exported: torch-free home of the size parser

__all__ = ["Field", "FeatureLoader", "LoaderStats", "parse_size", "split_rows", "valid_rows"]

_DONE = object()


@dataclass(frozen=True)
class Field:
    """One batch entry: ``batch[key]`` holds the selected rows of ``store``'s array ``array``."""

    key: str
    store: FeatureStore
    array: str


@dataclass
class LoaderStats:
    """Counters of a loader, over all its epochs (and staging)."""

    bytes_read: int = 0  # stored (uncompressed) bytes read from the stores
    read_seconds: float = 0.0  # time spent reading and decoding them
    wait_seconds: float = 0.0  # time the consumer waited for batches
    batches: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds > 0 else 0.0

    def wait_fraction(self, compute_seconds: float) -> float:
        """Share of (wait + compute) spent waiting for data: 0 means the loader keeps up."""
        total = self.wait_seconds + compute_seconds
        return self.wait_seconds / total if total > 0 else 0.0


class FeatureLoader:
    """Minibatches of rows from one or more paired stores (same row order), as dicts of tensors.

    ``rows`` (1-D ints) are deduplicated and sorted; ``shuffle=False`` yields them in ascending
    order. Batches are deterministic given (seed, epoch) within a mode. ``memory_budget`` (bytes)
    decides the mode; None is 25% of available RAM (and at most half the free GPU memory when
    ``device`` is CUDA). The key "rows" is reserved for ``return_rows``.
    """

    def __init__(
        self,
        fields: list[Field],
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        memory_budget: int | None = None,
        prefetch: int = 2,
        shuffle_window: int = 4,
        drop_last: bool = False,
        return_rows: bool = False,
    ):
        for name, value in (("batch_size", batch_size), ("prefetch", prefetch)):
            if value < 1:
                raise ValueError(f"Expected {name} >= 1. Got {value} instead.")
        if shuffle_window < 1:
            raise ValueError(f"Expected shuffle_window >= 1. Got {shuffle_window} instead.")
        keys = [f.key for f in fields]
        if len(set(keys)) != len(keys) or "rows" in keys:
            raise ValueError(f"Expected fields with distinct keys other than 'rows'. Got {keys}.")
        first = _check_paired([f.store for f in fields])
        self.fields = list(fields)
        self._arrays, self._is_feature, self._shapes, self._dtypes = {}, {}, {}, {}
        for f in fields:
            names = f.store.feature_arrays()
            names += [n for n in ("labels", "valid", "masks") if n in f.store.group]
            if f.array not in names:
                raise ValueError(
                    f"Expected an array of {f.store.url!r} in {names} for field {f.key!r}. "
                    f"Got {f.array!r} instead."
                )
            array = f.store.group[f.array]
            self._arrays[f.key] = array
            self._is_feature[f.key] = f.array in f.store.feature_arrays()
            self._shapes[f.key] = tuple(array.shape[1:])
            dtype = np.dtype(np.float32 if self._is_feature[f.key] else array.dtype)
            self._dtypes[f.key] = torch.from_numpy(np.empty(0, dtype)).dtype
        rows = np.asarray(rows)
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"Expected integer rows. Got dtype {rows.dtype} instead.")
        self.rows = np.unique(rows.astype(np.int64).ravel())
        if self.rows.size and not 0 <= self.rows[0] <= self.rows[-1] < first.num_images:
            raise ValueError(
                f"Expected rows in 0..{first.num_images - 1}. "
                f"Got {self.rows[0]}..{self.rows[-1]} instead."
            )
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        # a window's first batch needs all of its shards: read at least a window ahead
        self.prefetch, self.shuffle_window = max(prefetch, shuffle_window), shuffle_window
        self.drop_last, self.return_rows = drop_last, return_rows
        self.device = torch.device(device)
        # the rows of each shard of the first store, shards ascending: the unit of every read
        starts = np.flatnonzero(np.diff(self.rows // first.shard_size, prepend=-1))
        self._shards = np.split(self.rows, starts[1:]) if self.rows.size else []
        row_bytes = 8 + sum(
            math.prod(self._shapes[k]) * self._dtypes[k].itemsize for k in self._shapes
        )
        self.nbytes = len(self.rows) * row_bytes  # staged size in memory
        budget = _default_budget(self.device) if memory_budget is None else memory_budget
        self.staged = self.nbytes <= budget
        self.stats = LoaderStats()
        self._staged: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch (the same batches for the same (seed, epoch) and mode)."""
        inner = self._staged_batches(epoch) if self.staged else self._streamed_batches(epoch)
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(inner)
                except StopIteration:
                    return
                finally:
                    self.stats.wait_seconds += time.perf_counter() - start
                self.stats.batches += 1
                yield batch
        finally:
            inner.close()  # stops a streaming reader thread when the consumer breaks off

    def stage(self) -> None:
        """Read the selected rows into memory now (staged mode; else the first epoch does it)."""
        if not self.staged or self._staged is not None:
            return
        on_device = self.device.type == "cuda"
        target = self.device if on_device else torch.device("cpu")
        pin = not on_device and torch.cuda.is_available()
        n = len(self.rows)
        buffers = {
            key: torch.empty((n, *shape), dtype=self._dtypes[key], device=target, pin_memory=pin)
            for key, shape in self._shapes.items()
        }
        buffers["rows"] = torch.from_numpy(self.rows).to(target)
        position = 0
        for values in self._prefetched(self._shards):  # reads overlap the copies
            count = len(values["rows"])
            for key in self._shapes:
                buffers[key][position : position + count].copy_(torch.from_numpy(values[key]))
            position += count
        self._staged = buffers

    # -- internals ------------------------------------------------------------------------------
    def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """One contiguous read per field covering ``rows`` (sorted, within one shard).

        Raises ``UnreadableShardError`` when an object does not decode (Crc32c mismatch) and
        ``NonFiniteFeaturesError`` when a feature array holds NaN or inf in one of ``rows``.
        """
        start, stop = int(rows[0]), int(rows[-1]) + 1
        local = rows - start
        begin = time.perf_counter()
        out = {"rows": rows}
        for f in self.fields:
            try:
                values = self._arrays[f.key][start:stop]
                self.stats.bytes_read += values.nbytes
                if self._is_feature[f.key]:
                    values = f.store.decode_features(values)
            except Exception as err:  # zarr raises several types for checksum / decode faults
                shard = start // f.store.shard_size
                raise UnreadableShardError(f.store, f.array, shard, err) from err
            values = values[local]  # a fresh, writable array
            if self._is_feature[f.key]:
                require_finite(f.store, f.array, values, rows)
            out[f.key] = values
        self.stats.read_seconds += time.perf_counter() - begin
        return out

    def _finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.return_rows:
            batch.pop("rows")
        for key, value in batch.items():
            if value.dtype not in (torch.float32, torch.int64, torch.bool):
                value = value.long()
            batch[key] = value.to(self.device, non_blocking=True)
        return batch

    def _staged_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        self.stage()
        assert self._staged is not None
        n, size = len(self.rows), self.batch_size
        order = None
        if self.shuffle:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(n)
            order = torch.from_numpy(permutation).to(self._staged["rows"].device)
        for start in range(0, len(self) * size, size):
            span = slice(start, min(start + size, n))
            if order is None:
                yield self._finish({k: v[span] for k, v in self._staged.items()})
            else:
                index = order[span]
                yield self._finish({k: v.index_select(0, index) for k, v in self._staged.items()})

    def _streamed_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self._shards)
        order = rng.permutation(count) if self.shuffle else range(count)
        size, pool, window = self.batch_size, None, []
        for done, values in enumerate(self._prefetched([self._shards[i] for i in order]), 1):
            window.append(values)
            last = done == count
            if len(window) < self.shuffle_window and not last:
                continue
            parts = ([pool] if pool else []) + window
            pool = {k: np.concatenate([p[k] for p in parts]) for k in window[0]}
            window = []
            n = len(pool["rows"])
            if self.shuffle:
                permutation = rng.permutation(n)
                pool = {k: v[permutation] for k, v in pool.items()}
            full = n if last else n // size * size
            for start in range(0, full, size):
                stop = min(start + size, full)
                if stop - start < size and self.drop_last:
                    break
                yield self._finish({k: torch.from_numpy(v[start:stop]) for k, v in pool.items()})
            pool = {k: v[full:] for k, v in pool.items()}

    def _prefetched(self, shards: list[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Read ``shards`` in a background thread, ``prefetch`` ahead; its errors raise here."""
        ahead: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for shard_rows in shards:
                    if not put(self._read(shard_rows)):
                        return
                put(_DONE)
            except BaseException as err:  # handed to the consumer, raised there
                put(err)

        reader = threading.Thread(target=work, name="FeatureLoader-reader", daemon=True)
        reader.start()
        try:
            while (item := ahead.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            reader.join()


def _check_paired(stores) -> FeatureStore:
    """The first store, once every store is known to hold as many rows as it."""
    if not stores:
        raise ValueError("Expected at least one store. Got none instead.")
    for store in stores[1:]:
        if store.num_images != stores[0].num_images:
            raise ValueError(
                f"Expected paired stores with the same number of images. Got "
                f"{stores[0].num_images} in {stores[0].url!r} and {store.num_images} in "
                f"{store.url!r} instead."
            )
    return stores[0]


def _default_budget(device: torch.device) -> int:
    budget = psutil.virtual_memory().available // 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 2)
    return int(budget)


def valid_rows(*stores: FeatureStore) -> np.ndarray:
    """Rows (ascending int64) valid in every store and inside a marked shard of every store."""
    keep = np.ones(_check_paired(stores).num_images, bool)
    for store in stores:
        keep &= store.marked_mask() & np.asarray(store.read("valid"), bool)
    return np.flatnonzero(keep).astype(np.int64)


def split_rows(rows: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (train, val) rows, disjoint and each ascending.

    ``val_fraction`` 0 gives no val rows; above 0, at least one val row (and one train row) when
    there are two rows or more.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"Expected 0 <= val_fraction < 1. Got {val_fraction} instead.")
    rows = np.unique(np.asarray(rows, np.int64))
    n = len(rows)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    permutation = np.random.default_rng(seed).permutation(n)
    return np.sort(rows[permutation[n_val:]]), np.sort(rows[permutation[:n_val]])
