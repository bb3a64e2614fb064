"""A shard through one encoder: batches under autocast, cast to the store dtype on the device,
copied to host rows (pinned, overlapped on CUDA), the float16 range check, and the measured
precision error against fp32."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from featcache.encoders import Encoder
from featcache.errors import FeatcacheError
from featcache.extract.decode import _Item
from featcache.store import StoreSpec

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
