"""Errors featcache raises at its boundaries.

Each subclasses the builtin it resembles, so ``except FileNotFoundError`` still catches a missing
weights file, and each message says what was expected, what was given, and what to do.
"""

from __future__ import annotations

__all__ = [
    "FeatcacheError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "LayerIndexError",
    "BadImageError",
]


class FeatcacheError(Exception):
    """Base class of every error featcache raises on purpose."""


class UnknownModelError(FeatcacheError, LookupError):
    """A model name that is neither a preset nor a timm / open_clip model."""


class WeightsUnavailableError(FeatcacheError, FileNotFoundError):
    """Pretrained weights were needed but neither a file nor the hub could supply them."""


class LayerIndexError(FeatcacheError, IndexError):
    """A layer number outside 0..N for an encoder of depth N."""


class BadImageError(FeatcacheError, ValueError):
    """An image file that cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
