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

Batches never cross shard boundaries, so a resumed run computes exactly the batches an
uninterrupted run would and writes identical bytes. Unreadable images either stop the run
before their shard is marked (``fail``) or become invalid rows (NaN features, ``valid`` False)
recorded with their reason in the shard's marker (``skip``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from featcache.datasets import (
    DataOptions,
    Dataset,
    MaskLabelError,
    MaskLabels,
    Record,
    load_dataset,
)
from featcache.devices import check_device_name
from featcache.encoders import Encoder, load_encoder
from featcache.encoders.base import PRECISIONS
from featcache.errors import BadImageError, FeatcacheError
from featcache.images import decode_image, decode_mask
from featcache.store import FeatureStore, StoreError, StoreSpec, inner_chunk_images

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
    num_workers: int | None = None  # decoding threads; None: the cores this process may use
    shard_size: int = 256
    seed: int = 0
    weights: dict[str, str] = field(default_factory=dict)
    random_init: bool = False
    reduce_zero_label: bool | None = None  # None: the dataset layout's default (ADE20K: on)
    data_options: DataOptions | None = None  # reader options and class-balanced subset
    storage_options: dict[str, Any] | None = None
    # geometry for every model of the run (None: the model's default; presets share one)
    crop_pct: float | None = None
    resize_mode: str | None = None
    precision: str = "auto"  # fp32 | bf16 | fp16 autocast; auto: bf16 on CUDA, fp32 on CPU

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
        if self.precision not in ("auto", *PRECISIONS):
            raise FeatcacheError(
                f"Expected --precision auto, fp32, bf16 or fp16. Got {self.precision!r} instead."
            )
        if self.num_workers is None:
            self.num_workers = len(os.sched_getaffinity(0))
        if self.num_workers < 0:
            raise FeatcacheError(f"Expected --num-workers >= 0. Got {self.num_workers} instead.")
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


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> "bf16" on CUDA (several times the fp32 speed), "fp32" elsewhere; else as given."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


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
                **_data_options(config),
            },
            layers=tuple(sorted(set(config.layers))),
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
        image = record.decode(decode_image)  # the file or a container's member; its box
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


_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# store dtype -> (host row dtype, fill): bfloat16 rows are its bits, NaN = 0x7FC0 (torch's)
_HOST_ROWS = {"float16": (np.float16, np.nan), "bfloat16": (np.uint16, 0x7FC0),
              "float32": (np.float32, np.nan)}  # fmt: skip


def _host_array(value: torch.Tensor) -> np.ndarray:
    """A CPU tensor in a storage dtype as numpy (bfloat16: its bits, uint16), no copy."""
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(np.uint16)
    return value.numpy()


class _HostCopies:
    """Device batches, already in the storage dtype, -> rows of a shard's host arrays.

    CUDA: batch k's outputs are copied (``non_blocking``) on a side stream, after the compute
    stream's work for batch k, into pinned staging slot k % 2; a slot's rows are filled in the
    host arrays when the slot is needed again (batch k + 2) or at ``finish``. So batch k's copy
    overlaps batch k + 1's compute and the main thread waits only for a copy two batches old.
    One instance serves every shard of one encoder (the slots are allocated once, sized by the
    first batch: ``(batch, *row shape)`` per array). CPU: a plain copy into the rows.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots: list[dict[str, torch.Tensor]] = [{}, {}]
        self.pending: list[tuple | None] = [None, None]
        self.count = 0

    def put(self, values: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], rows) -> None:
        """Copy ``values[name]`` (B, ...) into ``arrays[name][rows]`` (now, or once copied)."""
        if not self.cuda:
            for name, value in values.items():
                arrays[name][rows] = _host_array(value)
            return
        slot = self.count % 2
        self.count += 1
        self._drain(slot)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        buffers, staged = self.slots[slot], {}
        with torch.cuda.stream(self.stream):
            for name, value in values.items():
                buffer = buffers.get(name)
                if (
                    buffer is None
                    or len(buffer) < len(value)
                    or buffer.shape[1:] != value.shape[1:]
                ):
                    buffer = buffers[name] = torch.empty(
                        value.shape, dtype=value.dtype, pin_memory=True
                    )
                staged[name] = buffer[: len(value)]
                staged[name].copy_(value, non_blocking=True)
                value.record_stream(self.stream)  # not reused by the compute stream before
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[slot] = (done, staged, arrays, rows)

    def _drain(self, slot: int) -> None:
        if self.pending[slot] is None:
            return
        done, staged, arrays, rows = self.pending[slot]
        self.pending[slot] = None
        done.synchronize()
        for name, part in staged.items():
            arrays[name][rows] = _host_array(part)

    def finish(self) -> None:
        """Fill the rows of the batches still in flight, oldest first."""
        for slot in (self.count % 2, (self.count + 1) % 2):
            self._drain(slot)


def _peak(values: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) float32: each row's largest magnitude, NaN ignored (inf kept)."""
    magnitude = values.detach().abs().flatten(1)
    return torch.where(magnitude.isnan(), 0, magnitude).amax(dim=1).float()


def _batch_outputs(
    encoder: Encoder, spec: StoreSpec, images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Store array name -> (B, ...) device tensor of one batch, as computed (no cast)."""
    keep = slice(None) if spec.tokens == "all" else slice(0, len(spec.encoder["layout"]["prefix"]))
    with torch.inference_mode(), encoder.autocast(spec.precision):
        taken, final, pooled = encoder.run_layers(images, spec.layers)
    outputs = {"pooled": pooled}
    if spec.tokens != "pooled":
        outputs.update({f"layers/{n}": taken[n][:, keep] for n in spec.layers})
        outputs["final"] = final[:, keep]
    return outputs


def _device_batch(inputs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack (3, H, W) inputs into (B, 3, H, W) on ``device``; via pinned memory for CUDA."""
    if device.type != "cuda":
        return torch.stack(inputs).to(device)
    pinned = torch.empty((len(inputs), *inputs[0].shape), dtype=inputs[0].dtype, pin_memory=True)
    return torch.stack(inputs, out=pinned).to(device, non_blocking=True)


def _encode_shard(
    which: int,
    encoder: Encoder,
    spec: StoreSpec,
    items: list[_Item],
    batch_size: int,
    copies: _HostCopies | None = None,
) -> dict[str, np.ndarray]:
    """Run encoder number ``which`` over a shard; rows keyed by store array name.

    Rows of unreadable images stay fill (NaN; bfloat16 stores: its NaN bits 0x7FC0). Batches
    hold consecutive readable rows of this shard only, so every run (fresh, resumed, another
    ``--shard`` split) forms the same batches. Each batch runs under ``spec.precision``
    autocast and is cast on the device to the storage dtype (float16, float32, or bfloat16
    whose bits arrive as uint16): the bytes the store keeps, half of float32's, cross to the
    host once, through ``copies``. For float16 stores each row's peak magnitude before the
    cast is kept on the device and read once per shard (``_check_float16_range``).
    """
    rows = len(items)
    storage = _STORAGE_DTYPES[spec.dtype]
    host_dtype, fill = _HOST_ROWS[spec.dtype]
    arrays = {
        name: np.full((rows, *shape), fill, host_dtype)
        for name, shape in spec.feature_row_shapes().items()
    }
    readable = [i for i, item in enumerate(items) if item.error is None]
    device = encoder.device
    copies = copies or _HostCopies(device)
    batch_peaks = []  # per batch: (arrays, B) on the device
    for start in range(0, len(readable), batch_size):
        batch_rows = readable[start : start + batch_size]
        images = _device_batch([items[i].inputs[which] for i in batch_rows], device)
        outputs = _batch_outputs(encoder, spec, images)
        if spec.dtype == "float16":
            batch_peaks.append(torch.stack([_peak(values) for values in outputs.values()]))
        copies.put({k: v.to(storage) for k, v in outputs.items()}, arrays, batch_rows)
    copies.finish()
    if batch_peaks:
        found = torch.cat(batch_peaks, dim=1).cpu().numpy()  # the one sync of the shard
        peaks = {name: np.zeros(rows, np.float32) for name in arrays}
        for name, row_peaks in zip(arrays, found, strict=True):
            peaks[name][readable] = row_peaks
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
            compute = " or --precision bf16" if spec.precision == "fp16" else ""
            raise FeatcacheError(
                f"{name} of {spec.encoder['name']} reaches {row_peaks[row]:.4g} on image "
                f"{items[row].record.id}, over float16's max 65504. Re-run with --dtype "
                f"bfloat16 (stored as uint16 bits, same range as float32) or float32{compute}."
            )


def _precision_error(
    encoder: Encoder, spec: StoreSpec, items: list[_Item], which: int, batch_size: int
) -> dict[str, Any]:
    """How far ``spec.precision`` lands from fp32 on the store's first batch (``items``: its
    first rows). Per stored array and over all: max and mean |x_precision - x_fp32| (before
    the storage cast), and mean |x_fp32| for scale. fp32 itself: zeros, nothing run."""
    rows = [i for i, item in enumerate(items) if item.error is None][:batch_size]
    error: dict[str, Any] = {"against": "fp32", "images": len(rows), "arrays": {}}
    if spec.precision == "fp32" or not rows:
        return {**error, "max_abs": 0.0, "mean_abs": 0.0, "mean_abs_fp32": None}
    images = _device_batch([items[i].inputs[which] for i in rows], encoder.device)
    reference = _batch_outputs(encoder, replace(spec, precision="fp32"), images)
    chosen = _batch_outputs(encoder, spec, images)
    total = values = scale = 0.0
    largest = 0.0
    for name, exact in reference.items():
        difference = (chosen[name].float() - exact.float()).abs()
        largest_here = float(difference.max())
        error["arrays"][name] = {"max_abs": largest_here, "mean_abs": float(difference.mean())}
        largest = max(largest, largest_here)
        total += float(difference.sum())
        scale += float(exact.float().abs().sum())
        values += difference.numel()
    return {
        **error,
        "max_abs": largest,
        "mean_abs": total / values,
        "mean_abs_fp32": scale / values,
    }


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
    with (
        ThreadPoolExecutor(max_workers=max(1, config.num_workers or 0)) as pool,
        ThreadPoolExecutor(max_workers=1) as reader,
        ThreadPoolExecutor(max_workers=1) as writer_thread,
    ):
        _record_precision_errors(plan, stores, pool)
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
                arrays = _encode_shard(
                    which, encoder, spec, items, config.batch_size, copies[which]
                )
                arrays.update(common)
                timings["compute_s"] += time.perf_counter() - started
                info = {"rows": list(store.shard_rows(shard)), "skipped": skipped}
                writer.submit(store, shard, arrays, info, written)
        writer.finish()
    return {
        "stores": [store.summary() for store in stores],
        "shards_processed": len(todo),
        "timings": timings,
    }


def _data_options(config: ExtractConfig) -> dict:
    """``{"options": ...}``: the reader and subset options a store's ``dataset`` attribute
    records, so ``featcache.datasets.reopen_dataset`` reads the dataset as extraction did; {} for
    the defaults (stores made without options keep their attributes)."""
    options = config.data_options.to_dict() if config.data_options is not None else {}
    return {"options": options} if options else {}
