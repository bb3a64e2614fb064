"""The writer thread: a shard's arrays and marker written while the next shard computes, and
the progress report once every store's write of a shard is done."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from featcache.store import FeatureStore, StoreError

ProgressFn = Callable[[int, int], None]


@dataclass
class _ShardProgress:
    """Calls ``progress(images, bytes)`` once all ``stores`` writes of one shard are done."""

    images: int
    stores: int
    progress: ProgressFn | None
    written: int = 0

    def __call__(self, nbytes: int) -> None:
        self.written += nbytes
        self.stores -= 1
        if self.stores == 0 and self.progress is not None:
            self.progress(self.images, self.written)


class _ShardWriter:
    """Writes shards on one background thread, at most one write behind the compute.

    ``submit`` first waits for the write before it (so at most two shards' arrays are in
    memory: the one being written and the one being computed), then hands this one to the
    thread. A write is ``FeatureStore.write_shard``: the shard's arrays, then its marker, in that
    order, on that one thread. An error of a write is raised by the next ``submit`` or by
    ``finish`` in the calling thread, so nothing after a failed shard is submitted.
    """

    def __init__(self, executor: ThreadPoolExecutor, timings: dict[str, float]) -> None:
        self.executor = executor
        self.timings = timings
        self.pending: Future | None = None
        self.on_done: Callable[[int], None] | None = None

    @staticmethod
    def _write(store: FeatureStore, shard: int, arrays: dict, info: dict) -> tuple[int, float]:
        started = time.perf_counter()
        try:
            written = store.write_shard(shard, arrays, info)
        except OSError as err:
            raise StoreError(
                f"Writing shard {shard} of {store.url} failed: {err}. That shard has no "
                "completion marker; free the space or fix the cause and re-run the same "
                "command to complete it."
            ) from err
        return written, time.perf_counter() - started

    def submit(self, store, shard, arrays, info, on_done: Callable[[int], None]) -> None:
        """Write ``arrays`` as ``shard`` of ``store``; ``on_done(bytes)`` runs once written."""
        self.finish()
        self.pending = self.executor.submit(self._write, store, shard, arrays, info)
        self.on_done = on_done

    def finish(self) -> None:
        """Wait for the pending write (raising its error), then report it."""
        if self.pending is None:
            return
        started = time.perf_counter()
        pending, self.pending = self.pending, None
        written, busy = pending.result()
        self.timings["write_s"] += time.perf_counter() - started
        self.timings["write_busy_s"] += busy
        self.on_done(written)
