"""Errors featcache raises at its boundaries.

Each subclasses the builtin it resembles, so ``except FileNotFoundError`` still catches a missing
weights file, and each message says what was expected, what was given, and what to do.
"""

from __future__ import annotations

import signal

__all__ = [
    "FeatcacheError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "LayerIndexError",
    "BadImageError",
    "Interrupted",
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


class Interrupted(FeatcacheError):
    """A SIGINT (Ctrl-C) or SIGTERM stopped the work; the message says what was kept and that
    the same command resumes. ``exit_code`` is 128 + the signal's number (130, 143), what a
    shell reports for a process that signal ended; ``at_once``: a second signal stopped it
    without waiting for a safe point."""

    def __init__(self, message: str, signal_name: str = "SIGTERM", *, at_once: bool = False):
        super().__init__(message)
        self.signal_name = signal_name
        self.at_once = at_once
        self.exit_code = 128 + signal.Signals[signal_name].value
