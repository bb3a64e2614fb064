"""Extraction: images -> frozen encoders -> feature stores, one shard at a time.

A run plans one store per encoder for the chosen split, then processes every shard that has
no completion marker (``--shard I/N`` takes shards i with i % N == I). For each shard:

  decode images once (thread pool, overlapped with compute)  ->  per encoder: preprocess,
  ``Encoder.run_layers`` (blocks run once, layers taken on the way), float32 -> store dtype
  ->  write the shard's rows of every array  ->  write the shard's marker (last)

The writes of one shard run on a writer thread while the next shard (or encoder) computes;
the next write starts only once the previous one, marker included, has finished, and a failed
write stops the run before anything after it is written.

Batches never cross shard boundaries, so a resumed run computes exactly the batches an
uninterrupted run would and writes identical bytes. Unreadable images either stop the run
before their shard is marked (``fail``) or become invalid rows (NaN features, ``valid`` False)
recorded with their reason in the shard's marker (``skip``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from featcache.data import Dataset, MaskLabelError, MaskLabels, Record, load_dataset
from featcache.devices import check_device_name
from featcache.encoders import Encoder, load_encoder
from featcache.errors import BadImageError, FeatcacheError
from featcache.images import decode_image, decode_mask
from featcache.store import FeatureStore, StoreError, StoreSpec

__all__ = ["ExtractConfig", "ExtractPlan", "plan_extraction", "run_extraction", "parse_shard"]


@dataclass
class ExtractConfig:
    """What ``featcache extract`` does; CLI options map one to one onto these fields."""

    models: list[str]
    data: str
    out: str
    layers: list[int]
    split: str | None = None
    batch_size: int = 32
    device: str = "auto"
    tokens: str = "all"
    compression: str = "none"
    dtype: str = "float16"
    shard: tuple[int, int] = (0, 1)
    on_bad_image: str = "fail"
    num_workers: int = 2
    shard_size: int = 256
    seed: int = 0
    weights: dict[str, str] = field(default_factory=dict)
    random_init: bool = False
    reduce_zero_label: bool | None = None  # None: the dataset layout's default (ADE20K: on)
    storage_options: dict[str, Any] | None = None
    # geometry for every model of the run (None: the model's default; presets share one)
    crop_pct: float | None = None
    resize_mode: str | None = None

    def __post_init__(self) -> None:
        import os

        from featcache.store import DTYPES, TOKEN_MODES, parse_compression

        if self.on_bad_image not in ("fail", "skip"):
            raise FeatcacheError(
                f"Expected --on-bad-image fail or skip. Got {self.on_bad_image!r} instead."
            )
        index, count = self.shard
        if not (count >= 1 and 0 <= index < count):
            raise FeatcacheError(f"Expected --shard I/N with 0 <= I < N. Got {index}/{count}.")
        if self.batch_size < 1:
            raise FeatcacheError(f"Expected --batch-size >= 1. Got {self.batch_size} instead.")
        if self.shard_size < 1:
            raise FeatcacheError(f"Expected --shard-size >= 1. Got {self.shard_size} instead.")
        if self.tokens not in TOKEN_MODES:
            raise FeatcacheError(
                f"Expected --tokens in {TOKEN_MODES}. Got {self.tokens!r} instead."
            )
        if self.dtype not in DTYPES:
            raise FeatcacheError(f"Expected --dtype in {DTYPES}. Got {self.dtype!r} instead.")
        try:
            kind, _ = parse_compression(self.compression)
        except ValueError:
            raise FeatcacheError(
                "Expected --compression none, zstd or bitround:K with 1 <= K <= 10. "
                f"Got {self.compression!r} instead."
            ) from None
        if kind == "bitround" and self.dtype != "float16":
            raise FeatcacheError(
                f"Expected --dtype float16 with --compression {self.compression} (it rounds "
                f"float16 mantissa bits). Got --dtype {self.dtype} instead."
            )
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise FeatcacheError(f"Expected 0 < --crop-pct <= 1. Got {self.crop_pct} instead.")
        if self.resize_mode not in (None, "shortest", "squash"):
            raise FeatcacheError(
                f"Expected --resize-mode shortest or squash. Got {self.resize_mode!r} instead."
            )
        if not self.layers and self.tokens != "pooled":
            raise FeatcacheError(
                "Expected at least one layer in --layers (only --tokens pooled stores none). "
                f"Got {self.layers!r} instead."
            )
        if "://" not in self.out and os.path.isfile(self.out):
            raise FeatcacheError(
                "Expected --out to be a directory (or a new path). "
                f"Got the file {self.out} instead."
            )


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" -> (I, N)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise FeatcacheError(f"Expected --shard I/N such as 0/4. Got {text!r} instead.") from None
    return index, count


def resolve_device(device: str) -> torch.device:
    """ "auto" (CUDA when present), "cpu", "cuda" or "cuda:N" -> a torch device."""
    check_device_name(device)
    kind, _, index = device.partition(":")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError(f"Expected --device cpu on this machine (no CUDA). Got {device!r}.")
    if index and int(index) >= torch.cuda.device_count():
        raise FeatcacheError(
            f"Expected --device cuda:N with N < {torch.cuda.device_count()} (the CUDA devices "
            f"here). Got {device!r} instead."
        )
    return torch.device(device)


@dataclass
class ExtractPlan:
    """The stores one run writes and the records, in store row order, that fill them."""

    config: ExtractConfig
    dataset: Dataset
    split: str
    records: list[Record]
    encoders: list[Encoder]
    specs: list[StoreSpec]
    urls: list[str]

    def estimated_bytes(self, spec: StoreSpec) -> int:
        """Uncompressed bytes of the feature arrays of one store."""
        bytes_per_value = 4 if spec.dtype == "float32" else 2
        values = sum(math.prod(shape) for shape in spec.feature_row_shapes().values())
        return values * bytes_per_value * spec.num_images


def _store_url(root: str, split: str, encoder: Encoder, spec: StoreSpec) -> str:
    """Where a store lives: derived from what defines it, so equal work lands in one place.

    ``ROOT/<split>/<encoder name>-<store id>.zarr``; an ``--out`` that itself ends in ``.zarr``
    names the store directly (one model only).
    """
    if root.rstrip("/").endswith(".zarr"):
        return root.rstrip("/")
    safe_name = encoder.name.replace(":", "_").replace("/", "_").replace("@", "_")
    return f"{root.rstrip('/')}/{split}/{safe_name}-{spec.store_id[:12]}.zarr"


def plan_extraction(config: ExtractConfig, encoders: list[Encoder] | None = None) -> ExtractPlan:
    """Load the dataset and encoders, validate layers, and derive one store spec per encoder.

    ``encoders`` replaces loading ``config.models`` by name (for models built in Python).
    ``config.crop_pct`` / ``config.resize_mode`` set the geometry of every model loaded by
    name (recorded in each encoder's spec and fingerprint, so each store's geometry is that
    run's); models passed as ``encoders`` bring their own. A split with masks defaults to
    ``resize_mode="squash"`` (the whole image, as segmentation is scored).
    """
    geometry = {
        key: value
        for key, value in (("crop_pct", config.crop_pct), ("resize_mode", config.resize_mode))
        if value is not None
    }
    if encoders is not None and geometry:
        raise FeatcacheError(
            "Expected --crop-pct / --resize-mode only for models loaded by name; pass "
            "crop_pct= / resize_mode= to load_encoder for encoders built in Python."
        )
    if config.out.rstrip("/").endswith(".zarr") and len(encoders or config.models) != 1:
        raise FeatcacheError(
            f"Expected one --model when --out names a store ({config.out}). "
            f"Got {len(encoders or config.models)}; give a root directory instead."
        )
    dataset = load_dataset(config.data, reduce_zero_label=config.reduce_zero_label)
    splits = dataset.splits()
    split = config.split or ("train" if "train" in splits else splits[0])
    records = dataset.ordered(split, seed=config.seed)
    if encoders is None and config.resize_mode is None and dataset.has_masks(split):
        # segmentation: the model sees, and the test score covers, the whole original image
        # (A.2.5 upsamples the logits to the original resolution); a centre crop would leave
        # the long side's borders unseen and unscored
        geometry["resize_mode"] = "squash"
    device = resolve_device(config.device)
    if encoders is None:
        encoders = [
            load_encoder(
                name,
                weights=config.weights.get(name),
                random_init=config.random_init,
                device=device,
                **geometry,
            )
            for name in config.models
        ]
    id_width = max([1, *(len(record.id.encode("utf-8")) for record in records)])
    specs, urls = [], []
    for encoder in encoders:
        name = encoder.name
        if config.tokens == "prefix" and encoder.num_prefix_tokens == 0:
            raise FeatcacheError(
                f"Expected an encoder with prefix tokens for --tokens prefix. {name} has none "
                "(use --tokens all or pooled)."
            )
        bad = [n for n in config.layers if not 0 <= n <= encoder.depth]
        if bad:
            raise FeatcacheError(
                f"Expected --layers in 0..{encoder.depth} for {name} (depth {encoder.depth}). "
                f"Got {bad} instead."
            )
        spec = StoreSpec(
            encoder=encoder.describe(),
            dataset={
                "source": dataset.source,
                "split": split,
                "manifest_hash": dataset.manifest_hash(split),
                "classes": list(dataset.classes),
                "mask_labels": dataset.mask_labels.to_dict(),
                "order_seed": config.seed,
                "num_images": len(records),
            },
            layers=tuple(sorted(set(config.layers))),
            tokens=config.tokens,
            dtype=config.dtype,
            compression=config.compression,
            shard_size=config.shard_size,
            mask_shape=tuple(encoder.image_size) if dataset.has_masks(split) else None,
            id_width=id_width,
        )
        specs.append(spec)
        urls.append(_store_url(config.out, split, encoder, spec))
    return ExtractPlan(config, dataset, split, records, encoders, specs, urls)


@dataclass
class _Item:
    """One image of a shard, decoded once and preprocessed for every encoder of the run."""

    record: Record
    inputs: list[torch.Tensor] | None  # per encoder: (3, H, W) float32
    masks: list[np.ndarray] | None  # per encoder: (H, W) int64 label map, when the split has masks
    error: str | None  # why the image was unreadable, else None


def _prepare(record: Record, encoders: list[Encoder], labels: MaskLabels | None = None) -> _Item:
    """Decode an image (and its mask) once; apply each encoder's own preprocessing.

    A mask is resized with each encoder's geometry (nearest neighbour), then its raw values
    become training labels by ``labels`` (the dataset's ``MaskLabels``: ``reduce_zero_label``,
    ignore value -> -1); values outside the declared classes make the image unreadable.
    """
    try:
        image = decode_image(record.path, name=record.id)
    except BadImageError as err:
        return _Item(record, None, None, err.reason)
    try:
        mask = None if record.mask is None else decode_mask(record.mask)
    except BadImageError as err:
        return _Item(record, None, None, f"mask {err}")
    inputs = [encoder.preprocess(image) for encoder in encoders]
    masks = None
    if mask is not None:
        labels = labels or MaskLabels()
        try:
            masks = [labels.apply(e.preprocessing.mask(mask)) for e in encoders]
        except MaskLabelError as err:
            return _Item(record, None, None, f"mask {record.mask}: {err}")
    return _Item(record, inputs, masks, None)


def _prefetched(pool: ThreadPoolExecutor, items: list, fn: Callable, depth: int) -> Iterator:
    """Map ``fn`` over ``items`` in a thread pool, at most ``depth`` results ahead."""
    pending = [pool.submit(fn, item) for item in items[:depth]]
    for index in range(len(items)):
        result = pending[index].result()
        if index + depth < len(items):
            pending.append(pool.submit(fn, items[index + depth]))
        yield result


def _encode_shard(
    which: int, encoder: Encoder, spec: StoreSpec, items: list[_Item], batch_size: int
) -> dict[str, np.ndarray]:
    """Run encoder number ``which`` over a shard; rows keyed by store array name.

    Rows of unreadable images stay NaN. Batches hold consecutive readable rows of this shard
    only, so every run (fresh, resumed, another ``--shard`` split) forms the same batches.
    Feature rows are float16 for float16 stores (numpy's float32 -> float16 cast, the very cast
    ``FeatureStore.encode_features`` applies, done per batch: half the memory of a float32
    shard and no second pass), float32 otherwise.
    """
    rows = len(items)
    row_dtype = np.float16 if spec.dtype == "float16" else np.float32
    arrays = {
        name: np.full((rows, *shape), np.nan, row_dtype)
        for name, shape in spec.feature_row_shapes().items()
    }
    # per row, the largest finite-or-inf magnitude (NaN ignored) of the float32 output
    peaks = {name: np.zeros(rows, np.float32) for name in arrays} if row_dtype is np.float16 else {}
    keep = slice(None) if spec.tokens == "all" else slice(0, len(spec.encoder["layout"]["prefix"]))
    readable = [i for i, item in enumerate(items) if item.error is None]
    device = next(encoder.module.parameters()).device
    for start in range(0, len(readable), batch_size):
        batch_rows = readable[start : start + batch_size]
        images = torch.stack([items[i].inputs[which] for i in batch_rows])  # (B, 3, H, W)
        with torch.inference_mode():
            taken, final, pooled = encoder.run_layers(images.to(device), spec.layers)
            outputs = {"pooled": pooled}
            if spec.tokens != "pooled":
                outputs.update({f"layers/{n}": taken[n][:, keep] for n in spec.layers})
                outputs["final"] = final[:, keep]
            for name, values in outputs.items():
                values = values.float()
                if peaks:
                    magnitude = values.abs().flatten(1)
                    magnitude = torch.where(magnitude.isnan(), 0.0, magnitude)
                    peaks[name][batch_rows] = magnitude.amax(dim=1).cpu().numpy()
                with np.errstate(over="ignore"):  # over 65504: refused below, by peaks
                    arrays[name][batch_rows] = values.cpu().numpy()
    _check_float16_range(peaks, spec, items)
    if spec.mask_shape is not None:
        masks = np.full((rows, *spec.mask_shape), -1, np.int16)
        for i in readable:
            masks[i] = items[i].masks[which]
        arrays["masks"] = masks
    return arrays


def _check_float16_range(peaks: dict[str, np.ndarray], spec: StoreSpec, items) -> None:
    """float16 tops out at 65504: ViT "massive activations" can exceed it. Refuse to store inf.

    ``peaks`` holds, per array, each row's largest magnitude before the float16 cast (skipped
    rows 0); empty unless the store is float16.
    """
    limit = float(np.finfo(np.float16).max)
    for name, row_peaks in peaks.items():
        if len(row_peaks) and row_peaks.max() > limit:
            row = int(row_peaks.argmax())
            raise FeatcacheError(
                f"{name} of {spec.encoder['name']} reaches {row_peaks[row]:.4g} on image "
                f"{items[row].record.id}, over float16's max 65504. Re-run with --dtype "
                "bfloat16 (stored as uint16 bits, same range as float32) or float32."
            )


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
    marked = [store.marked_shards() for store in stores]
    todo = [shard for shard in mine if any(shard not in done for done in marked)]
    for store in stores:
        store.remove_stale_partials(todo)
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
    with (
        ThreadPoolExecutor(max_workers=max(1, config.num_workers)) as pool,
        ThreadPoolExecutor(max_workers=1) as reader,
        ThreadPoolExecutor(max_workers=1) as writer_thread,
    ):
        writer = _ShardWriter(writer_thread, timings)
        shards_ahead = _prefetched(reader, todo, read_shard, depth=1)
        for shard in todo:
            started = time.perf_counter()
            items = next(shards_ahead)
            timings["wait_s"] += time.perf_counter() - started
            skipped = [{"id": item.record.id, "reason": item.error} for item in items if item.error]
            if skipped and config.on_bad_image == "fail":
                writer.finish()  # the shards before this one are complete
                raise BadImageError(
                    skipped[0]["id"],
                    f"{skipped[0]['reason']} ({len(skipped)} unreadable image(s) in shard "
                    f"{shard}; nothing of this shard was written; --on-bad-image skip records "
                    "and skips them)",
                )
            common = {
                "ids": np.array([item.record.id for item in items], dtype=object),
                "labels": np.array([item.record.label for item in items], np.int64),
                "valid": np.array([item.error is None for item in items], bool),
            }
            needed = [which for which in range(len(stores)) if shard not in marked[which]]
            written = _ShardProgress(len(items), len(needed), progress)
            for which in needed:
                encoder, spec, store = plan.encoders[which], plan.specs[which], stores[which]
                started = time.perf_counter()
                arrays = {**_encode_shard(which, encoder, spec, items, config.batch_size), **common}
                timings["compute_s"] += time.perf_counter() - started
                info = {"rows": list(store.shard_rows(shard)), "skipped": skipped}
                writer.submit(store, shard, arrays, info, written)
        writer.finish()
    return {
        "stores": [store.summary() for store in stores],
        "shards_processed": len(todo),
        "timings": timings,
    }


def images_in_shards(plan: ExtractPlan, shard_size: int, count: int, index: int) -> int:
    """Images the shards of this ``--shard I/N`` process hold (for the progress total)."""
    total = len(plan.records)
    shards = math.ceil(total / shard_size)
    return sum(min(shard_size, total - s * shard_size) for s in range(shards) if s % count == index)
