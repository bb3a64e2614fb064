"""Planning a run: the dataset split, the encoders, one ``StoreSpec`` and URL per encoder
(``plan_extraction``), and the shards some planned store still lacks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from featcache.datasets import Dataset, Record, load_dataset
from featcache.encoders import Encoder, load_encoder
from featcache.errors import FeatcacheError
from featcache.extract.config import ExtractConfig, resolve_device, resolve_precision
from featcache.extract.layers import resolve_layers
from featcache.store import FeatureStore, StoreError, StoreSpec, inner_chunk_images


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
        """Bytes one store will hold uncompressed: every array it writes.

        Image-chunked arrays (layers, final, pooled: 4 bytes a value for float32, else 2;
        masks: int16, H x W) write whole inner chunks of ``inner_chunk_images`` rows, so each
        shard's rows round up to that; ``ids`` (``id_width`` bytes), ``labels`` (int64) and
        ``valid`` (bool) write one whole chunk of ``shard_size`` rows per shard. With
        compression "none" a written store comes within 5% of it (chunk checksums, shard
        indexes, metadata and markers add; zstd-compressed ids take less)."""
        bytes_per_value = 4 if spec.dtype == "float32" else 2
        values = sum(math.prod(shape) for shape in spec.feature_row_shapes().values())
        chunked = values * bytes_per_value
        if spec.mask_shape is not None:
            chunked += 2 * math.prod(spec.mask_shape)
        n, size = spec.num_images, spec.shard_size
        inner = inner_chunk_images(size)
        chunked_rows = sum(-(-min(size, n - start) // inner) * inner for start in range(0, n, size))
        shard_rows = -(-n // size) * size
        return chunked * chunked_rows + (spec.id_width + 8 + 1) * shard_rows


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
    """Load the dataset and encoders, resolve each encoder's layers (``config.layers`` by its
    depth: ``featcache.extract.layers``) and derive one store spec per encoder.

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
    dataset = load_dataset(config.data, config.reduce_zero_label, config.data_options)
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
        layers = resolve_layers(config.layers, encoder.depth, name)
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
                **_data_options(config),
            },
            layers=layers,
            tokens=config.tokens,
            dtype=config.dtype,
            compression=config.compression,
            shard_size=config.shard_size,
            mask_shape=tuple(encoder.image_size) if dataset.has_masks(split) else None,
            id_width=id_width,
            precision=resolve_precision(config.precision, encoder.device),
        )
        specs.append(spec)
        urls.append(_store_url(config.out, split, encoder, spec))
    return ExtractPlan(config, dataset, split, records, encoders, specs, urls)


def _data_options(config: ExtractConfig) -> dict:
    """``{"options": ...}``: the reader and subset options a store's ``dataset`` attribute
    records, so ``featcache.datasets.reopen_dataset`` reads the dataset as extraction did; {} for
    the defaults (stores made without options keep their attributes)."""
    options = config.data_options.to_dict() if config.data_options is not None else {}
    return {"options": options} if options else {}


def _pending(shards: Iterable[int], marked: list[set[int]]) -> list[int]:
    """The ``shards`` that some store (its marked shards in ``marked``) still lacks."""
    return [shard for shard in shards if any(shard not in done for done in marked)]


def images_to_extract(plan: ExtractPlan) -> int:
    """Images of this ``--shard I/N`` slice's shards that some planned store still lacks, as
    ``run_extraction`` will choose them (a store not created yet lacks every shard); 0 when
    every store is complete. Reads each store's markers; creates nothing."""
    config = plan.config
    marked = []
    for url in plan.urls:
        try:
            marked.append(
                FeatureStore.open(url, storage_options=config.storage_options).marked_shards()
            )
        except StoreError:  # not created yet
            marked.append(set())
    index, count = config.shard
    size, total = config.shard_size, len(plan.records)
    pending = _pending(range(index, math.ceil(total / size), count), marked)
    return sum(min(size, total - shard * size) for shard in pending)
