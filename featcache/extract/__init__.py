"""Extraction: images -> frozen encoders -> feature stores, one shard at a time.

A run plans one store per encoder for the chosen split, then processes every shard that has
no completion marker (``--shard I/N`` takes shards i with i % N == I). For each shard:

  decode images once (thread pool, overlapped with compute)  ->  per encoder: preprocess,
  ``Encoder.run_layers`` under ``--precision`` autocast (blocks run once, layers taken on the
  way), cast to the store dtype on the device, copied to host rows (``_HostCopies``)
  ->  write the shard's rows of every array  ->  write the shard's marker (last)

On CUDA the batch inputs go up from pinned memory, and each batch's outputs come down on a
side stream into one of two pinned staging slots while the next batch computes; the float16
range check stays on the device with one sync per shard. On CPU the same code is plain copies.
A store records its precision, and once per store the max / mean absolute difference of its
first batch against an fp32 forward (``precision_error``).

The writes of one shard run on a writer thread while the next shard (or encoder) computes;
the next write starts only once the previous one, marker included, has finished, and a failed
write stops the run before anything after it is written.

Every row records its content identity: the blake2b digest of the bytes decoded (the
``digests`` array) and its files' stamps (size, mtime_ns, in the shard's marker). Planning
compares the stamps of marked shards with the files now: a changed file is an error naming it
(``--on-changed-data error``, the default) or its shard is unmarked and extracted again
(``reextract``).

Batches never cross shard boundaries, so a resumed run computes exactly the batches an
uninterrupted run would and writes identical bytes. Unreadable images either stop the run
before their shard is marked (``fail``) or become invalid rows (NaN features, ``valid`` False)
recorded with their reason in the shard's marker (``skip``).

Modules: ``config`` (``ExtractConfig``, devices, precision), ``layers`` (``--layers`` resolved
by each encoder's depth: numbers, negative indices, ``all``, the default), ``plan``
(``plan_extraction``: the stores of a run; the shards still to do), ``decode`` (an image and
its mask, decoded once and preprocessed per encoder), ``forward`` (a shard through an encoder,
down to host rows), ``writer`` (the writer thread), ``run`` (``run_extraction``: the shard loop).
"""

from featcache.extract.config import ExtractConfig, parse_shard, resolve_device
from featcache.extract.plan import ExtractPlan, images_to_extract, plan_extraction
from featcache.extract.run import extraction_stopped, refresh_changed, run_extraction

__all__ = [
    "ExtractConfig",
    "ExtractPlan",
    "extraction_stopped",
    "images_to_extract",
    "parse_shard",
    "plan_extraction",
    "refresh_changed",
    "resolve_device",
    "run_extraction",
]
