"""Extraction on a Dask distributed cluster: one task per shard.

The driver plans the run and writes only store metadata; each task runs the ordinary
single-process engine (``run_extraction``) on one shard in a worker process, which writes the
shard's arrays and then its marker. Tasks are idempotent (a marked shard is skipped, an
unmarked one is rewritten whole with identical bytes), so Dask's retries after a lost worker
are safe and the finished store equals a single-process run bit for bit.

Schedulers:
  ``local``      a ``LocalCluster`` with one single-threaded worker process per CPU core
  ``local:N``    a ``LocalCluster`` with N worker processes
  ``tcp://H:P``  an existing scheduler (``dask scheduler`` + ``dask worker`` on each machine)

One worker per GPU: start workers with dask-cuda (``dask cuda worker tcp://H:P`` or
``LocalCUDACluster()``), which gives each worker process one GPU as ``cuda:0`` through
``CUDA_VISIBLE_DEVICES``; ``--device auto`` then uses it. Job arrays (``--shard I/N``) restrict
the shards a driver submits, exactly as they do for a single process.

Ctrl-C (SIGINT) or SIGTERM, as for a single process (``featcache.interrupts``): the driver
keeps one task per worker thread in flight and submits the next as one finishes, so after the
first signal it submits none, waits for the shards in flight (each task writes its shard and
then the marker), and raises ``Interrupted`` counting each store's complete shards and saying
that the same command resumes the rest. A second signal stops at once: the tasks are
cancelled, and a shard cut short stays unmarked. A local cluster's workers are started
ignoring SIGINT, so a terminal's Ctrl-C, sent to the whole process group, does not kill the
shards in flight (a worker restarted after a crash is not; an existing scheduler's workers are
other processes).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from featcache.errors import FeatcacheError, Interrupted
from featcache.extract import (
    ExtractConfig,
    ExtractPlan,
    extraction_stopped,
    plan_extraction,
    refresh_changed,
    run_extraction,
)
from featcache.interrupts import children_ignore_ctrl_c, stop_on_signal, stop_requested
from featcache.store import FeatureStore

__all__ = ["connect", "extract_on_dask"]

_PLANS: dict[str, ExtractPlan] = {}  # per worker process: encoders load once, not per shard


@contextlib.contextmanager
def connect(scheduler: str) -> Iterator:
    """A ``distributed.Client`` for ``local``, ``local:N`` or ``tcp://host:port``; a local
    cluster is shut down on exit, an existing scheduler is left running."""
    from distributed import Client, LocalCluster

    if scheduler == "local" or scheduler.startswith("local:"):
        workers = int(scheduler.split(":", 1)[1]) if ":" in scheduler else os.cpu_count() or 1
        if workers < 1:
            raise FeatcacheError(f"Expected local:N with N >= 1. Got {scheduler!r} instead.")
        with children_ignore_ctrl_c():  # the workers finish their shards on a Ctrl-C
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
        with cluster, Client(cluster) as client:
            yield client
    elif scheduler.startswith("tcp://"):
        with Client(scheduler) as client:
            yield client
    else:
        raise FeatcacheError(
            f"Expected --scheduler local, local:N or tcp://HOST:PORT. Got {scheduler!r} instead."
        )


def _extract_shard(config: ExtractConfig, shard: int) -> dict[str, Any]:
    """The task: one shard of every store, in a worker process (plan cached per process)."""
    key = json.dumps(asdict(config), sort_keys=True, default=str)
    if key not in _PLANS:
        _PLANS[key] = plan_extraction(config)
    result = run_extraction(_PLANS[key], shards=[shard])
    return {
        "shard": shard,
        "shards_processed": result["shards_processed"],
        "timings": result["timings"],
    }


def extract_on_dask(
    plan: ExtractPlan,
    client,
    *,
    progress: Callable[[int, int], None] | None = None,
    retries: int = 3,
) -> dict[str, Any]:
    """Create the planned stores' metadata, run one task per missing shard; summarise.

    ``progress(images_done, bytes_written)`` is called as shards finish (bytes are not
    reported back from workers: 0).
    """
    from distributed import as_completed

    config = plan.config
    stores = [
        FeatureStore.create(url, spec, storage_options=config.storage_options)
        for url, spec in zip(plan.urls, plan.specs, strict=True)
    ]
    index, count = config.shard
    mine = range(index, stores[0].num_shards, count)
    marked = [refresh_changed(plan, store, mine) for store in stores]  # changed data: unmarked
    todo = [shard for shard in mine if any(shard not in done for done in marked)]
    waiting = iter(todo)

    def submit() -> list:
        shard = next(waiting, None)
        if shard is None or stop_requested():
            return []
        key = f"featcache-{stores[0].attrs['store_id']}-shard-{shard}"
        return [client.submit(_extract_shard, config, shard, pure=False, retries=retries, key=key)]

    timings = {"wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "write_busy_s": 0.0}
    in_flight = max(1, sum(client.nthreads().values()))  # one task per worker thread
    with stop_on_signal("stopping after the shards in flight, which are marked"):
        running = as_completed([f for _ in range(in_flight) for f in submit()])
        try:
            for future in running:
                done = future.result()  # raises the task's error after its retries
                for name, value in done["timings"].items():
                    timings[name] = timings.get(name, 0.0) + value
                if progress is not None:
                    start, stop = stores[0].shard_rows(done["shard"])
                    progress(stop - start, 0)
                for more in submit():
                    running.add(more)
        except Interrupted as err:  # a second signal: the shards in flight are dropped
            client.cancel(list(running.futures))
            raise extraction_stopped(err.signal_name, stores, at_once=True) from None
        if stop_requested():
            raise extraction_stopped(stop_requested(), stores, at_once=False)
    # reopened: the workers added attrs (precision_error) that these objects have not seen
    options = config.storage_options
    return {
        "stores": [FeatureStore.open(s.url, storage_options=options).summary() for s in stores],
        "shards_processed": len(todo),
        "timings": timings,
        "scheduler": str(client.scheduler.address),
    }
