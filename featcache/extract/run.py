"""``run_extraction``: create or reopen the planned stores and fill their missing shards, with
decoding ahead of and writing behind the compute.

A SIGINT (Ctrl-C) or SIGTERM stops the run: no shard computation starts after it, the one in
progress is written, the writes in progress finish with their markers, and ``Interrupted``
says how many shards of each store are complete and that the same command resumes the rest. A
second signal stops at once: decoding and computing are dropped, and only a write already
started finishes (a write is never cut: a cut one would leave an unmarked shard anyway).
Main thread only (``featcache.interrupts``); a Dask task's run keeps the default."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from featcache.errors import BadImageError, Interrupted
from featcache.extract.decode import _Item, _prepare
from featcache.extract.forward import _encode_shard, _HostCopies, _precision_error
from featcache.extract.plan import ExtractPlan, _pending, current_shards
from featcache.extract.writer import ProgressFn, _ShardProgress, _ShardWriter
from featcache.interrupts import stop_on_signal, stop_requested
from featcache.store import FeatureStore


def _prefetched(pool: ThreadPoolExecutor, items: list, fn: Callable, depth: int) -> Iterator:
    """Map ``fn`` over ``items`` in a thread pool, at most ``depth`` results ahead."""
    pending = [pool.submit(fn, item) for item in items[:depth]]
    for index in range(len(items)):
        result = pending[index].result()
        if index + depth < len(items):
            pending.append(pool.submit(fn, items[index + depth]))
        yield result


def _record_precision_errors(
    plan: ExtractPlan, stores: list[FeatureStore], pool: ThreadPoolExecutor
) -> None:
    """Measure ``precision_error`` for each store that lacks it, on the store's first batch
    (rows 0.. of shard 0, whichever shards this run does), and add it to the store's attrs.
    Racing processes measure the same batch and write the same values."""
    missing = [which for which, store in enumerate(stores) if "precision_error" not in store.attrs]
    if not missing:
        return
    first = plan.records[: min(plan.config.batch_size, plan.specs[0].shard_size)]
    needs_images = any(plan.specs[which].precision != "fp32" for which in missing)
    labels = plan.dataset.mask_labels
    items = list(
        pool.map(lambda r: _prepare(r, plan.encoders, labels), first if needs_images else [])
    )
    for which in missing:
        encoder, spec = plan.encoders[which], plan.specs[which]
        error = _precision_error(encoder, spec, items, which, plan.config.batch_size)
        stores[which].update_attrs({"precision_error": error})


def refresh_changed(plan: ExtractPlan, store: FeatureStore, shards) -> set[int]:
    """The marked shards of ``shards`` whose files are unchanged (``current_shards``: a changed
    one is an error under ``--on-changed-data error``); under ``reextract`` each changed
    shard's marker is removed first, so a crash while it is rewritten leaves it unmarked."""
    markers = store.valid_markers()  # read once: which shards are marked, and their stamps
    current = current_shards(plan, store, shards, markers)
    for shard in set(markers) & set(shards) - current:
        store.unmark(shard)
    return current


def extraction_stopped(signal_name: str, stores: list[FeatureStore], at_once: bool) -> Interrupted:
    """The one-line ``Interrupted`` of a stopped extraction: each store's complete shards."""
    counts = ", ".join(
        f"{len(store.marked_shards())} of {store.num_shards} shards of {store.url}"
        for store in stores
    )
    how = f"at once by a second {signal_name}" if at_once else f"by {signal_name}"
    return Interrupted(
        f"Stopped {how}: {counts} are complete (marked and kept); the same command resumes "
        "the rest.",
        signal_name,
        at_once=at_once,
    )


def run_extraction(
    plan: ExtractPlan, *, progress: ProgressFn | None = None, shards: list[int] | None = None
) -> dict[str, Any]:
    """Create or reopen every planned store, fill its missing shards, return a summary.

    ``progress(images_done, bytes_written)`` is called after each shard is written. The summary
    holds ``stores`` (``FeatureStore.summary()`` each, with skipped files), ``shards_processed``
    and ``timings``, seconds of the main thread: ``wait_s`` waiting for decoded images,
    ``compute_s`` computing, ``write_s`` waiting for writes; and ``write_busy_s``, seconds the
    writer thread spent writing (overlapped with compute, so mostly not in the total).
    ``shards`` restricts the run to those shards (one Dask task each); by default every shard
    of this ``--shard I/N`` slice. Already-marked shards are always skipped.
    """
    config = plan.config
    stores = [
        FeatureStore.create(url, spec, storage_options=config.storage_options)
        for url, spec in zip(plan.urls, plan.specs, strict=True)
    ]
    index, count = config.shard
    mine = shards if shards is not None else range(index, stores[0].num_shards, count)
    marked = [refresh_changed(plan, store, mine) for store in stores]
    todo = _pending(mine, marked)
    for store in stores:
        store.remove_stale_partials(todo)
    copies = [_HostCopies(encoder.device) for encoder in plan.encoders]
    timings = {"wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "write_busy_s": 0.0}

    def read_shard(shard: int) -> list[_Item]:
        start, stop = stores[0].shard_rows(shard)
        labels = plan.dataset.mask_labels
        return list(
            pool.map(lambda r: _prepare(r, plan.encoders, labels), plan.records[start:stop])
        )

    # The reader thread decodes the next shard (through the worker pool) while the main thread
    # computes this one; one shared pool could deadlock a shard task on its own subtasks. The
    # writer thread writes the previous shard meanwhile (zarr's encoding and file writes mostly
    # release the GIL). Leaving the block, normally or by an error, waits for a started write.
    stopped: Interrupted | None = None  # by a second signal
    cut = False  # a first signal left shards to do
    with (
        stop_on_signal("stopping after the shards being written, which are marked"),
        ThreadPoolExecutor(max_workers=max(1, config.num_workers or 0)) as pool,
        ThreadPoolExecutor(max_workers=1) as reader,
        ThreadPoolExecutor(max_workers=1) as writer_thread,
    ):
        try:
            _record_precision_errors(plan, stores, pool)
            writer = _ShardWriter(writer_thread, timings)
            shards_ahead = _prefetched(reader, todo, read_shard, depth=1)
            for shard in todo:
                if stop_requested():
                    cut = True
                    break
                started = time.perf_counter()
                items = next(shards_ahead)
                timings["wait_s"] += time.perf_counter() - started
                skipped = [
                    {"id": item.record.id, "reason": item.error} for item in items if item.error
                ]
                if skipped and config.on_bad_image == "fail":
                    writer.finish()  # the shards before this one are complete
                    raise BadImageError(
                        skipped[0]["id"],
                        f"{skipped[0]['reason']} ({len(skipped)} unreadable image(s) in shard "
                        f"{shard}; nothing of this shard was written; --on-bad-image skip "
                        "records and skips them)",
                    )
                common = {
                    "ids": np.array([item.record.id for item in items], dtype=object),
                    "labels": np.array([item.record.label for item in items], np.int64),
                    "valid": np.array([item.error is None for item in items], bool),
                    "digests": np.frombuffer(b"".join(i.digest for i in items), np.uint8).reshape(
                        len(items), -1
                    ),
                }
                stamps = [item.stamp for item in items]
                needed = [which for which in range(len(stores)) if shard not in marked[which]]
                written = _ShardProgress(len(items), len(needed), progress)
                for which in needed:
                    if stop_requested():  # the other stores' shards stay unmarked
                        cut = True
                        break
                    encoder, spec, store = plan.encoders[which], plan.specs[which], stores[which]
                    started = time.perf_counter()
                    arrays = _encode_shard(
                        which, encoder, spec, items, config.batch_size, copies[which]
                    )
                    arrays.update(common)
                    timings["compute_s"] += time.perf_counter() - started
                    info = {
                        "rows": list(store.shard_rows(shard)),
                        "skipped": skipped,
                        "stamps": stamps,
                    }
                    writer.submit(store, shard, arrays, info, written)
            writer.finish()
        except Interrupted as err:  # a second signal, anywhere above
            stopped = err
        signal_name = stopped.signal_name if stopped is not None else cut and stop_requested()
        if signal_name:  # leaving the block waits for running tasks only
            for executor in (pool, reader):
                executor.shutdown(wait=False, cancel_futures=True)
    if signal_name:
        raise extraction_stopped(signal_name, stores, at_once=stopped is not None)
    return {
        "stores": [store.summary() for store in stores],
        "shards_processed": len(todo),
        "timings": timings,
    }
