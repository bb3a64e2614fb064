"""Minibatches of cached features for the stitch trainers (docs/design.md).

A :class:`FeatureLoader` picks one of two modes from a memory budget:

* staged: the selected rows of every field are read once (one contiguous read per shard and
  field, shards in order) into memory: onto the device when it is CUDA, else host RAM (pinned
  when CUDA is available). Each epoch is a seeded permutation sliced into batches there.
* streamed: shards are visited in a seeded random order, ``shuffle_window`` shards at a time;
  a window's rows (plus the previous window's remainder) are shuffled and cut into batches, so
  only an epoch's last batch is short. A pool of ``read_workers`` threads reads and decodes
  the next windows (at least ``prefetch`` shards ahead) straight into reused window buffers
  (pinned when CUDA is available); each batch is then an ``index_select`` of its window, as a
  staged batch is of the staged arrays.

Reads (``_read_into``: one shard of one field into a tensor) read each needed shard object
once, sequentially, chunk by chunk, straight from its file rather than through zarr for
uncompressed local stores (``FeatureStore.read_shard_chunks``, next to the writer of that
layout), and cast by torch (``_read_object``): a shard read this way, float32
and checks included, takes about a sixth of the time of zarr's read (one event-loop thread for
every reader, per-chunk overhead) plus numpy's float16 cast (``benchmarks/streamed_loading.py``,
"shard" part). Other stores (compressed, remote) are read through zarr, one
``array[start:stop]`` per shard.

Batches are ``dict[str, torch.Tensor]`` on the loader's device: features float32, (B, T, D)
for token arrays ("layers/<n>", "final") and (B, D) for "pooled"; integer arrays int64 (labels
(B,), masks (B, H, W)); "valid" bool; with ``return_rows`` also "rows" (B,) int64 store rows.

Every read is checked as it arrives (staged: once, while staging; streamed: each shard read):
the store proves each marked shard object against its marker on its first read
(``featcache.store.proof``: ``ShardProofError``, naming store, array and shard), an object that
does not decode raises ``UnreadableShardError``, NaN or inf in a
selected row of a feature array raises ``integrity.NonFiniteFeaturesError``; both name the
store, the array and the rows, so callers select valid rows (``valid_rows``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from featcache.store import FeatureStore, StoreError, UnreadableShardError
from stitchtrain.data.integrity import require_finite
from stitchtrain.data.sizes import parse_size  # re-exported: torch-free home of the size parser

__all__ = [
    "Field",
    "FeatureLoader",
    "LoaderStats",
    "default_read_workers",
    "parse_size",
    "split_rows",
    "valid_rows",
]


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
    read_seconds: float = 0.0  # wall time during which at least one read or decode ran
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
    order. Batches are deterministic given (seed, epoch) within a mode, whatever
    ``read_workers`` (reader threads; None: ``default_read_workers()``). ``memory_budget``
    (bytes) decides the mode; None is 25% of available RAM (and at most half the free GPU memory
    when ``device`` is CUDA). The key "rows" is reserved for ``return_rows``.
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
        read_workers: int | None = None,
    ):
        read_workers = default_read_workers() if read_workers is None else read_workers
        checked = (("batch_size", batch_size), ("prefetch", prefetch))
        for name, value in (*checked, ("read_workers", read_workers)):
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
        self._direct: dict[str, bool] = {}  # read by _read_object (FeatureStore's shard files)
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
            self._direct[f.key] = f.store.reads_shard_files(f.array)
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
        self.read_workers = read_workers
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
        self._clock = _ReadClock(self.stats)
        self._staged: dict[str, torch.Tensor] | None = None
        self._windows: list[_Window] = []  # window buffers not in use by an epoch, for reuse
        self._chunk_buffers = threading.local()  # each reader thread's read buffer

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
            inner.close()  # stops the reader threads when the consumer breaks off

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
        with self._readers() as readers:
            reads, position = [], 0
            for rows in self._shards:
                span = slice(position, position + len(rows))
                reads += [
                    readers.submit(self._read_into, f, rows, buffers[f.key][span])
                    for f in self.fields
                ]
                position += len(rows)
            for read in reads:  # in read order: the first fault of the serial order raises
                read.result()
        self._staged = buffers

    # -- internals ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _readers(self) -> Iterator[ThreadPoolExecutor]:
        """``read_workers`` reader threads; on exit, queued reads are dropped, running ones
        finish, and every thread is joined (also when the consumer breaks off)."""
        pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="FeatureLoader-reader")
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_into(self, f: Field, rows: np.ndarray, out: torch.Tensor) -> None:
        """Decode rows ``rows`` (ascending store rows, one shard of the first store) of field
        ``f`` into ``out`` (len(rows), *shape) of the field's dtype (features float32).

        Raises ``UnreadableShardError`` when an object does not decode (a Crc32c mismatch, a
        truncated or missing object) and ``NonFiniteFeaturesError`` when a feature array holds
        NaN or inf in one of ``rows``. Thread-safe: reader threads run it side by side.
        """
        host = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=out.dtype)
        size = f.store.shard_size  # the field's own shards: paired stores may be cut otherwise
        shards = rows // size
        bounds = np.flatnonzero(np.diff(shards, prepend=-1)).tolist() + [len(rows)]
        with self._clock.reading():
            for begin, end in zip(bounds[:-1], bounds[1:], strict=False):
                shard = int(shards[begin])
                local, part = rows[begin:end] - shard * size, host[begin:end]
                try:
                    if self._direct[f.key]:
                        nbytes = self._read_object(f, shard, local, part)
                    else:
                        nbytes = self._read_zarr(f, shard, local, part)
                except StoreError:  # the store's own: an unproven shard, a named decode fault
                    raise
                except Exception as err:  # checksum, size, I/O and zarr's decode faults
                    rows_of = f.store.shard_rows(shard)
                    raise UnreadableShardError(f.store.url, f.array, shard, rows_of, err) from err
                self._clock.add_bytes(nbytes)
            # NaN or inf anywhere makes the sum NaN or inf, and summing is far cheaper than
            # torch.isfinite; a finite overflow to inf only costs the exact check
            if self._is_feature[f.key] and not math.isfinite(float(host.sum())):
                require_finite(f.store, f.array, host.numpy(), rows)  # names the rows
        if host is not out:
            out.copy_(host)

    def _read_zarr(self, f: Field, shard: int, local: np.ndarray, out: torch.Tensor) -> int:
        """Rows ``local`` of ``shard`` through zarr (``FeatureStore.read_stored``: the shard
        proven against its marker first): one read of their span (the whole shard when every
        row is selected, which zarr fetches as one object)."""
        start = shard * f.store.shard_size
        values = f.store.read_stored(
            f.array, slice(start + int(local[0]), start + int(local[-1]) + 1)
        )
        _decode_into(out, values, self._is_bfloat16(f), local - local[0])
        return values.nbytes

    def _read_object(self, f: Field, shard: int, local: np.ndarray, out: torch.Tensor) -> int:
        """Rows ``local`` (ascending, within the shard) of ``f``'s object for ``shard``, read
        by ``FeatureStore.read_shard_chunks`` (only the chunks holding a selected row, each
        byte once, Crc32c-checked) into this thread's buffer and decoded into ``out``; returns
        the bytes read. An absent chunk reads as the fill value."""
        array = self._arrays[f.key]
        inner, row_shape, bfloat16 = array.chunks[0], array.shape[1:], self._is_bfloat16(f)
        chunk_of, nbytes = local // inner, 0
        needed = np.unique(chunk_of).tolist()
        for chunk, values, count in f.store.read_shard_chunks(
            f.array, shard, needed, self._chunk_buffer
        ):
            rows = local[chunk_of == chunk] - chunk * inner
            target = out[np.searchsorted(local, chunk * inner) :][: len(rows)]
            nbytes += count
            if values is None:
                fill = np.full((len(rows), *row_shape), array.metadata.fill_value, array.dtype)
                _decode_into(target, fill, bfloat16)
            else:
                _decode_into(target, values, bfloat16, None if len(rows) == inner else rows)
        return nbytes

    def _chunk_buffer(self, nbytes: int) -> np.ndarray:
        """This thread's read buffer, at least ``nbytes`` (kept: no page faults per chunk)."""
        buffer = getattr(self._chunk_buffers, "buffer", None)
        if buffer is None or len(buffer) < nbytes:
            buffer = self._chunk_buffers.buffer = np.empty(nbytes, np.uint8)
        return buffer

    def _is_bfloat16(self, f: Field) -> bool:
        return self._is_feature[f.key] and f.store.attrs["logical_dtype"] == "bfloat16"

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
        """Windows of ``shuffle_window`` shards in a seeded order, each shuffled with the
        previous window's remainder and cut into batches (the generator draws the shard order,
        then one permutation per window, so the batches never depend on read timing).

        Window ``j`` is read into buffer ``j % k`` at rows ``head:``, ``head = batch_size -
        1``; the remainder of window ``j - 1`` (fewer than ``batch_size`` rows) is copied in
        just before it, so the pool is the view ``[head - remainder, head + window rows)``.
        Reads of window ``j + k`` start once window ``j``'s batches are cut; ``k`` buffers
        keep at least ``prefetch`` shards read ahead.
        """
        rng = np.random.default_rng([self.seed, epoch])
        count, width, size = len(self._shards), self.shuffle_window, self.batch_size
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        windows = [[self._shards[i] for i in order[s : s + width]] for s in range(0, count, width)]
        head = size - 1
        slots = self._take_windows(min(len(windows), 1 + -(-self.prefetch // width)), head)
        pending: dict[int, list[Future]] = {}
        try:
            with self._readers() as readers:

                def submit(j: int) -> None:
                    slot, position, reads = slots[j % len(slots)], head, []
                    slot.wait_copied()
                    for rows in windows[j]:
                        span = slice(position, position + len(rows))
                        slot.tensors["rows"][span] = torch.from_numpy(rows)
                        reads += [
                            readers.submit(self._read_into, f, rows, slot.tensors[f.key][span])
                            for f in self.fields
                        ]
                        position += len(rows)
                    pending[j] = reads

                for j in range(len(slots)):
                    submit(j)
                remainder = 0
                for j, window in enumerate(windows):
                    for read in pending.pop(j):  # in read order: the first fault raises
                        read.result()
                    slot = slots[j % len(slots)]
                    lo, hi = head - remainder, head + sum(len(rows) for rows in window)
                    pool = {key: value[lo:hi] for key, value in slot.tensors.items()}
                    n, last = hi - lo, j == len(windows) - 1
                    full = n if last else n // size * size
                    index = torch.from_numpy(rng.permutation(n)) if self.shuffle else None
                    batches = slot.on_device(pool, index, self.device)
                    for start in range(0, full, size):
                        stop = min(start + size, full)
                        if stop - start < size and self.drop_last:
                            break
                        yield self._finish(batches(start, stop))
                    remainder = n - full
                    if remainder:  # rows full..n-1 of the shuffled pool open the next pool
                        following = slots[(j + 1) % len(slots)].tensors
                        for key, value in pool.items():
                            rest = value[full:] if index is None else value[index[full:]]
                            following[key][head - remainder : head] = rest
                    if j + len(slots) < len(windows):
                        submit(j + len(slots))
        finally:
            self._windows += slots

    def _take_windows(self, count: int, head: int) -> list[_Window]:
        """``count`` window buffers holding ``head`` + ``shuffle_window`` shards of rows,
        reused across epochs (pinned memory is slow to allocate)."""
        capacity = head + self.shuffle_window * max((len(r) for r in self._shards), default=0)
        kept = [w for w in self._windows if len(w.tensors["rows"]) >= capacity]
        slots = kept[:count]
        self._windows = [w for w in self._windows if all(w is not s for s in slots)]
        pin = torch.cuda.is_available()
        while len(slots) < count:
            shapes = {**self._shapes, "rows": ()}
            dtypes = {**self._dtypes, "rows": torch.int64}
            tensors = {
                key: torch.empty((capacity, *shape), dtype=dtypes[key], pin_memory=pin)
                for key, shape in shapes.items()
            }
            slots.append(_Window(tensors))
        return slots


class _Window:
    """One window buffer: host tensors ``(capacity, *shape)`` per field plus "rows"."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self._copied: torch.cuda.Event | None = None

    def on_device(self, pool: dict[str, torch.Tensor], index: torch.Tensor | None, device):
        """A function (start, stop) -> the batch of shuffled pool positions start..stop-1.

        On CUDA the pool goes to the device first (asynchronously, from pinned memory) and
        batches are gathered there; the buffer is not refilled before that copy is done.
        """
        if device.type == "cuda":
            pool = {k: v.to(device, non_blocking=True) for k, v in pool.items()}
            self._copied = torch.cuda.Event()
            self._copied.record()
            index = None if index is None else index.to(device, non_blocking=True)

        def batch(start: int, stop: int) -> dict[str, torch.Tensor]:
            if index is None:
                return {k: v[start:stop].clone() for k, v in pool.items()}
            return {k: v.index_select(0, index[start:stop]) for k, v in pool.items()}

        return batch

    def wait_copied(self) -> None:
        """Block until the last copy of this buffer to the device has finished (CUDA)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None


class _ReadClock:
    """Counts stored bytes read and the wall time during which at least one read runs (so
    ``LoaderStats.gb_per_s`` stays bytes per second of reading with several reader threads)."""

    def __init__(self, stats: LoaderStats):
        self.stats, self._lock, self._active, self._since = stats, threading.Lock(), 0, 0.0

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._lock:
            if self._active == 0:
                self._since = time.perf_counter()
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self.stats.read_seconds += time.perf_counter() - self._since

    def add_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.stats.bytes_read += nbytes


def _decode_into(
    out: torch.Tensor, values: np.ndarray, bfloat16: bool, rows: np.ndarray | None = None
) -> None:
    """Stored ``values`` (numpy, storage dtype; only ``rows`` of them when given) into ``out``:
    bfloat16 bits widened, float16 cast to float32 (torch's cast, far faster than numpy's),
    integer and bool arrays copied."""
    source = torch.from_numpy(values)
    if bfloat16:
        source = source.view(torch.bfloat16)
    if rows is not None:
        source = source.index_select(0, torch.from_numpy(np.asarray(rows, np.int64)))
    out.copy_(source)


def default_read_workers() -> int:
    """Reader threads of a loader when not given: the cores this process may use, at most 8."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(8, len(usable) if usable else os.cpu_count() or 1))


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
