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
        if config.layers == "default":  # a hybrid's source layers of another shape left out
            layers = encoder.storable_layers(layers)
        encoder.check_storable(layers)  # given explicitly, they are refused
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


def _changed_file(plan: ExtractPlan, shard: int, marker: dict) -> str | None:
    """The first file of ``shard`` (in row order; an image, then its mask) whose stamp (size,
    mtime_ns) differs from the one its marker records, with the change; None when none does.
    A remote container (no stamp) is not checked; a marker without stamps checks nothing."""
    recorded = marker.get("stamps")
    if recorded is None:
        return None
    start = shard * plan.config.shard_size
    for record, was in zip(plan.records[start : start + len(recorded)], recorded, strict=True):
        now = record.stamp()
        if now is None or was is None or list(now) == list(was):
            continue
        files = [record.path] if record.mask is None else [record.path, record.mask]
        for index, path in enumerate(files):
            old, new = was[2 * index : 2 * index + 2], now[2 * index : 2 * index + 2]
            if old != new:
                return (
                    f"{path} (image {record.id}: size {old[0]} -> {new[0]} bytes, mtime_ns "
                    f"{old[1]} -> {new[1]}; -1: missing)"
                )
    return None


def current_shards(
    plan: ExtractPlan,
    store: FeatureStore,
    shards: Iterable[int],
    markers: dict[int, dict] | None = None,
) -> set[int]:
    """The marked shards of ``shards`` whose files are unchanged since they were written
    (``markers``: the store's valid markers, as already read; default: read them).

    Each marked shard's recorded file stamps are compared with the files now (one ``stat`` per
    row). A changed shard is an error naming the first changed file under
    ``--on-changed-data error`` (the default); under ``reextract`` it is left out, so the run
    extracts it again. Stamps equal in size and mtime hide a change: only a forced re-extract
    sees it. Nothing is written here."""
    markers = store.valid_markers() if markers is None else markers
    current = set()
    for shard in shards:
        if shard not in markers:
            continue
        changed = _changed_file(plan, shard, markers[shard])
        if changed is None:
            current.add(shard)
        elif plan.config.on_changed_data == "error":
            raise FeatcacheError(
                f"Expected the files shard {shard} of {store.url} was extracted from. Got "
                f"{changed} changed since, instead. Re-run with --on-changed-data reextract "
                "to extract the changed shards again."
            )
    return current


def _pending(shards: Iterable[int], marked: list[set[int]]) -> list[int]:
    """The ``shards`` that some store (its marked shards in ``marked``) still lacks."""
    return [shard for shard in shards if any(shard not in done for done in marked)]


def images_to_extract(plan: ExtractPlan) -> int:
    """Images of this ``--shard I/N`` slice's shards that some planned store still lacks, as
    ``run_extraction`` will choose them (a store not created yet lacks every shard); 0 when
    every store is complete. Reads each store's markers; creates nothing. Shards whose files
    changed count as pending under ``--on-changed-data reextract``, else are an error
    (``current_shards``)."""
    config = plan.config
    index, count = config.shard
    size, total = config.shard_size, len(plan.records)
    mine = range(index, math.ceil(total / size), count)
    marked = []
    for url in plan.urls:
        try:
            store = FeatureStore.open(url, storage_options=config.storage_options)
        except StoreError:  # not created yet
            marked.append(set())
            continue
        marked.append(current_shards(plan, store, mine))
    pending = _pending(mine, marked)
    return sum(min(size, total - shard * size) for shard in pending)
