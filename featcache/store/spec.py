"""What defines a store: ``StoreSpec`` (encoder, dataset, layers, settings), whose hash is the
store id, and the format version and setting values it accepts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from featcache.store.codec import parse_compression

FORMAT_VERSION = 3  # 3: row digests (the ``digests`` array) and file stamps in markers
READABLE_FORMAT_VERSIONS = (2, 3)  # 2: no row digests; read, never written
DIGEST_BYTES = 16  # a row digest: featcache.datasets.DIGEST_SIZE bytes of blake2b
TOKEN_MODES = ("all", "prefix", "pooled")
DTYPES = ("float16", "bfloat16", "float32")
PRECISIONS = ("fp32", "bf16", "fp16")  # featcache.encoders.PRECISIONS (zarr-only module here)


@dataclass(frozen=True)
class StoreSpec:
    """Everything that defines a store's contents; its hash is the store id.

    Attributes:
        encoder: ``Encoder.describe()`` (includes the weights+preprocessing fingerprint).
        dataset: source, split, manifest_hash, classes, order_seed, num_images.
        layers: layer numbers stored under ``layers/<n>``.
        tokens: "all" (every token), "prefix" (prefix tokens only) or "pooled" (no layers).
        dtype: float16 | bfloat16 (stored as uint16 bits) | float32.
        compression: "none", "zstd" or "bitround:K" (keep K mantissa bits, then zstd; lossy).
        shard_size: images per shard (the unit of writing and resuming).
        mask_shape: (H, W) of stored masks, or None when the split has no masks.
        id_width: bytes of the longest UTF-8 id of the split (the ``ids`` row width).
        precision: what the encoder computed in: "fp32", or "bf16" / "fp16" autocast
            (``featcache.encoders.PRECISIONS``); it changes the numbers, so it enters the id.
    """

    encoder: dict[str, Any]
    dataset: dict[str, Any]
    layers: tuple[int, ...]
    tokens: str = "all"
    dtype: str = "float16"
    compression: str = "none"
    shard_size: int = 256
    mask_shape: tuple[int, int] | None = None
    id_width: int = 64
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"Expected tokens in {TOKEN_MODES}. Got {self.tokens!r} instead.")
        if self.dtype not in DTYPES:
            raise ValueError(f"Expected dtype in {DTYPES}. Got {self.dtype!r} instead.")
        parse_compression(self.compression)
        depth = self.encoder["depth"]
        bad = [n for n in self.layers if not 0 <= n <= depth]
        if bad:
            raise ValueError(
                f"Expected layers in 0..{depth} for {self.encoder['name']}. Got {bad} instead."
            )
        if self.shard_size < 1:
            raise ValueError(f"Expected shard_size >= 1. Got {self.shard_size} instead.")
        if self.id_width < 1:
            raise ValueError(f"Expected id_width >= 1. Got {self.id_width} instead.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Expected precision in {PRECISIONS}. Got {self.precision!r} instead.")

    @property
    def num_images(self) -> int:
        return int(self.dataset["num_images"])

    def feature_row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every feature array: ``{"layers/6": (T, D), ..., "pooled": (D',)}``.

        T is every token (prefix + patches) for ``tokens="all"``, the prefix tokens only for
        ``"prefix"``; ``"pooled"`` stores no token arrays.
        """
        layout = self.encoder["layout"]
        prefix = len(layout["prefix"])
        tokens = (
            prefix if self.tokens == "prefix" else prefix + layout["grid"][0] * layout["grid"][1]
        )
        width = self.encoder["width"]
        shapes: dict[str, tuple[int, ...]] = {}
        if self.tokens != "pooled":
            shapes.update({f"layers/{n}": (tokens, width) for n in sorted(self.layers)})
            shapes["final"] = (tokens, width)
        shapes["pooled"] = (self.encoder["pooled_width"],)
        return shapes

    @property
    def store_id(self) -> str:
        """Hash of what defines the contents (not of where or when it was written)."""
        identity = {
            "encoder_fingerprint": self.encoder["fingerprint"],
            "encoder_spec": self.encoder["spec"],
            "manifest_hash": self.dataset["manifest_hash"],
            "split": self.dataset["split"],
            "order_seed": self.dataset["order_seed"],
            "layers": sorted(self.layers),
            "tokens": self.tokens,
            "dtype": self.dtype,
            "compression": self.compression,
            "shard_size": self.shard_size,
            "format_version": FORMAT_VERSION,
        }
        if self.precision != "fp32":  # stores made before the option were fp32: same ids
            identity["precision"] = self.precision
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
