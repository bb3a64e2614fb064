"""What an extraction does: ``ExtractConfig`` (the ``featcache extract`` options, checked), the
``--shard I/N`` and ``--device`` values, and the precision ``auto`` resolves to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from featcache.datasets import DataOptions
from featcache.devices import check_device_name
from featcache.encoders.base import PRECISIONS
from featcache.errors import FeatcacheError
from featcache.extract.layers import parse_layers


@dataclass
class ExtractConfig:
    """What ``featcache extract`` does; CLI options map one to one onto these fields."""

    models: list[str]
    data: str
    out: str
    # layer numbers, or --layers as typed ("2,6,-1", "all"); "default": the depth-aware default
    # (featcache.extract.layers resolves it per encoder)
    layers: list[int] | str = "default"
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
    # a marked shard whose files changed (size or mtime) since it was written: refuse, naming
    # the first changed file ("error"), or extract it again ("reextract")
    on_changed_data: str = "error"

    def __post_init__(self) -> None:
        import os

        from featcache.store import DTYPES, TOKEN_MODES, parse_compression

        if self.on_bad_image not in ("fail", "skip"):
            raise FeatcacheError(
                f"Expected --on-bad-image fail or skip. Got {self.on_bad_image!r} instead."
            )
        if self.on_changed_data not in ("error", "reextract"):
            raise FeatcacheError(
                "Expected --on-changed-data error or reextract. "
                f"Got {self.on_changed_data!r} instead."
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
        layers = self.layers
        if isinstance(layers, str) and layers != "default":
            layers = parse_layers(layers)  # a typo fails here, before any model loads
        if not layers and self.tokens != "pooled":
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
