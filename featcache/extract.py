"""Extraction: images -> frozen encoders -> feature stores, one shard at a time.

A run plans one store per encoder for the chosen split, then processes every shard that has
no completion marker (``--shard I/N`` takes shards i with i % N == I). For each shard:

  decode images once (thread pool, overlapped with compute)  ->  per encoder: preprocess,
  ``Encoder.run_layers`` (blocks run once, layers taken on the way), float32 -> store dtype
  ->  write the shard's rows of every array  ->  write the shard's marker (last)

Batches never cross shard boundaries, so a resumed run computes exactly the batches an
uninterrupted run would and writes identical bytes. Unreadable images either stop the run
before their shard is marked (``fail``) or become invalid rows (NaN features, ``valid`` False)
recorded with their reason in the shard's marker (``skip``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from featcache.data import Dataset, Record, load_dataset
from featcache.encoders import Encoder, load_encoder
from featcache.errors import BadImageError, FeatcacheError
from featcache.images import decode_image
from featcache.store import FeatureStore, StoreSpec

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
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.on_bad_image not in ("fail", "skip"):
            raise FeatcacheError(
                f"Expected --on-bad-image fail or skip. Got {self.on_bad_image!r} instead."
            )
        index, count = self.shard
        if not (count >= 1 and 0 <= index < count):
            raise FeatcacheError(f"Expected --shard I/N with 0 <= I < N. Got {index}/{count}.")
        if self.batch_size < 1:
            raise FeatcacheError(f"Expected --batch-size >= 1. Got {self.batch_size} instead.")


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" -> (I, N)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise FeatcacheError(f"Expected --shard I/N such as 0/4. Got {text!r} instead.") from None
    return index, count


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatcacheError(f"Expected --device cpu on this machine (no CUDA). Got {device!r}.")
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
        bytes_per_value = 4 if spec.dtype == "float32" else 2
        layout = spec.encoder["layout"]
        tokens = len(layout["prefix"]) + layout["grid"][0] * layout["grid"][1]
        if spec.tokens == "prefix":
            tokens = len(layout["prefix"])
        token_arrays = 0 if spec.tokens == "pooled" else len(spec.layers) + 1  # + final
        per_image = token_arrays * tokens * spec.encoder["width"] + spec.encoder["pooled_width"]
        return per_image * bytes_per_value * spec.num_images


def _store_url(root: str, split: str, encoder: Encoder, spec: StoreSpec) -> str:
    """Where a store lives: derived from what defines it, so equal work lands in one place."""
    safe_name = encoder.name.replace(":", "_").replace("/", "_").replace("@", "_")
    return f"{root.rstrip('/')}/{split}/{safe_name}-{spec.store_id[:12]}.zarr"


def plan_extraction(config: ExtractConfig) -> ExtractPlan:
    """Load the dataset and encoders, validate layers, and derive one store spec per encoder."""
    dataset = load_dataset(config.data)
    splits = dataset.splits()
    split = config.split or ("train" if "train" in splits else splits[0])
    records = dataset.ordered(split, seed=config.seed)
    device = resolve_device(config.device)
    encoders, specs, urls = [], [], []
    for name in config.models:
        encoder = load_encoder(
            name,
            weights=config.weights.get(name),
            random_init=config.random_init,
            device=device,
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
                "order_seed": config.seed,
                "num_images": len(records),
            },
            layers=tuple(sorted(set(config.layers))),
            tokens=config.tokens,
            dtype=config.dtype,
            compression=config.compression,
            shard_size=config.shard_size,
            mask_shape=tuple(encoder.image_size) if dataset.has_masks(split) else None,
        )
        encoders.append(encoder)
        specs.append(spec)
        urls.append(_store_url(config.out, split, encoder, spec))
    return ExtractPlan(config, dataset, split, records, encoders, specs, urls)


@dataclass
class _Decoded:
    record: Record
    image: Image.Image | None
    mask: Image.Image | None
    error: str | None


def _decode(record: Record) -> _Decoded:
    try:
        image = decode_image(record.path, name=record.id)
        mask = None
        if record.mask is not None:
            with Image.open(record.mask) as handle:
                mask = handle.copy()
        return _Decoded(record, image, mask, None)
    except BadImageError as err:
        return _Decoded(record, None, None, err.reason)
    except OSError as err:
        return _Decoded(record, None, None, f"mask {record.mask}: {err}")


def _prefetched(pool: ThreadPoolExecutor, items: list, fn: Callable, depth: int) -> Iterator:
    """Map ``fn`` over ``items`` in a thread pool, at most ``depth`` results ahead."""
    pending = [pool.submit(fn, item) for item in items[:depth]]
    for index in range(len(items)):
        result = pending[index].result()
        if index + depth < len(items):
            pending.append(pool.submit(fn, items[index + depth]))
        yield result


def _shard_arrays(
    encoder: Encoder,
    spec: StoreSpec,
    decoded: list[_Decoded],
    batch_size: int,
    pool: ThreadPoolExecutor,
) -> dict[str, np.ndarray]:
    """Run one encoder over a shard's decoded images; float32 arrays keyed by store array."""
    rows = len(decoded)
    layout = spec.encoder["layout"]
    keep_tokens = slice(None) if spec.tokens == "all" else slice(0, len(layout["prefix"]))
    arrays: dict[str, np.ndarray] = {}
    valid_rows = [i for i, item in enumerate(decoded) if item.error is None]
    device = next(encoder.module.parameters()).device
    for start in range(0, len(valid_rows), batch_size):
        batch_rows = valid_rows[start : start + batch_size]
        tensors = list(pool.map(lambda i: encoder.preprocess(decoded[i].image), batch_rows))
        images = torch.stack(tensors).to(device)  # (B, 3, H, W)
        with torch.inference_mode():
            taken, final, pooled = encoder.run_layers(images, spec.layers)
        outputs = {"pooled": pooled}
        if spec.tokens != "pooled":
            outputs.update({f"layers/{n}": taken[n][:, keep_tokens] for n in spec.layers})
            outputs["final"] = final[:, keep_tokens]
        for name, values in outputs.items():
            values = values.float().cpu().numpy()
            if name not in arrays:
                arrays[name] = np.full((rows, *values.shape[1:]), np.nan, np.float32)
            arrays[name][batch_rows] = values
    if not valid_rows:  # every image of the shard was skipped: all rows stay NaN
        width = spec.encoder["width"]
        tokens = len(layout["prefix"]) + layout["grid"][0] * layout["grid"][1]
        if spec.tokens == "prefix":
            tokens = len(layout["prefix"])
        arrays["pooled"] = np.full((rows, spec.encoder["pooled_width"]), np.nan, np.float32)
        if spec.tokens != "pooled":
            for name in [f"layers/{n}" for n in spec.layers] + ["final"]:
                arrays[name] = np.full((rows, tokens, width), np.nan, np.float32)
    _check_float16_range(arrays, spec, decoded)
    if spec.mask_shape is not None:
        masks = np.full((rows, *spec.mask_shape), -1, np.int16)
        for i in valid_rows:
            masks[i] = encoder.preprocessing.mask(decoded[i].mask)
        arrays["masks"] = masks
    return arrays


def _check_float16_range(arrays: dict[str, np.ndarray], spec: StoreSpec, decoded) -> None:
    """float16 tops out at 65504: ViT "massive activations" can exceed it. Refuse to store inf."""
    if spec.dtype != "float16":
        return
    limit = float(np.finfo(np.float16).max)
    for name, values in arrays.items():
        peak = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 0.0
        if peak > limit:
            row = int(np.nanargmax(np.abs(values).reshape(len(values), -1).max(axis=1)))
            raise FeatcacheError(
                f"{name} of {spec.encoder['name']} reaches {peak:.4g} on image "
                f"{decoded[row].record.id}, over float16's max 65504. Re-run with --dtype "
                "bfloat16 (stored as uint16 bits, same range as float32) or float32."
            )


ProgressFn = Callable[[int, int], None]


def run_extraction(
    plan: ExtractPlan, *, progress: ProgressFn | None = None
) -> list[dict[str, Any]]:
    """Create or reopen every planned store, fill its missing shards, return summaries.

    ``progress(images_done, bytes_written)`` is called after each shard.
    """
    config = plan.config
    stores = [
        FeatureStore.create(url, spec, storage_options=config.storage_options)
        for url, spec in zip(plan.urls, plan.specs, strict=True)
    ]
    for store in stores:
        store.remove_partials()
    num_shards = stores[0].num_shards
    index, count = config.shard
    todo = [
        shard
        for shard in range(num_shards)
        if shard % count == index and any(shard not in s.marked_shards() for s in stores)
    ]
    timings = {"decode_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
    skipped_all: list[dict[str, str]] = []
    # Two pools: one thread reads the next shard ahead (decoding through the worker pool) while
    # the main thread computes; sharing one pool could deadlock a shard task on its own subtasks.
    with (
        ThreadPoolExecutor(max_workers=max(1, config.num_workers)) as pool,
        ThreadPoolExecutor(max_workers=1) as reader,
    ):
        decode_iter = _prefetched(
            reader, todo, lambda s: _decode_shard(plan, stores[0], s, pool), depth=1
        )
        for shard in todo:
            started = time.perf_counter()
            decoded = next(decode_iter)
            timings["decode_s"] += time.perf_counter() - started
            skipped = [{"id": d.record.id, "reason": d.error} for d in decoded if d.error]
            if skipped and config.on_bad_image == "fail":
                first = skipped[0]
                raise BadImageError(
                    first["id"],
                    f"{first['reason']} ({len(skipped)} unreadable image(s) in shard {shard}; "
                    "nothing of this shard was written; use --on-bad-image skip to record and "
                    "skip them)",
                )
            skipped_all.extend(skipped)
            written = 0
            for encoder, spec, store in zip(plan.encoders, plan.specs, stores, strict=True):
                if shard in store.marked_shards():
                    continue
                started = time.perf_counter()
                arrays = _shard_arrays(encoder, spec, decoded, config.batch_size, pool)
                arrays["ids"] = np.array([d.record.id for d in decoded], dtype=object)
                arrays["labels"] = np.array([d.record.label for d in decoded], np.int64)
                arrays["valid"] = np.array([d.error is None for d in decoded], bool)
                timings["compute_s"] += time.perf_counter() - started
                started = time.perf_counter()
                store.write_shard(
                    shard, arrays, {"rows": list(store.shard_rows(shard)), "skipped": skipped}
                )
                timings["write_s"] += time.perf_counter() - started
                written += (
                    sum(a.nbytes for k, a in arrays.items() if k in store.feature_arrays()) // 2
                )
            if progress is not None:
                progress(len(decoded), written)
    summaries = []
    for store in stores:
        summary = store.summary()
        summary["timings"] = timings
        summaries.append(summary)
    return summaries


def _decode_shard(plan: ExtractPlan, store: FeatureStore, shard: int, pool) -> list[_Decoded]:
    start, stop = store.shard_rows(shard)
    return list(pool.map(_decode, plan.records[start:stop]))


def images_in_shards(plan: ExtractPlan, shard_size: int, count: int, index: int) -> int:
    """Images the shards of this ``--shard I/N`` process hold (for the progress total)."""
    total = len(plan.records)
    shards = math.ceil(total / shard_size)
    return sum(min(shard_size, total - s * shard_size) for s in range(shards) if s % count == index)
