"""Device names the commands accept, checked without importing torch."""

from __future__ import annotations

from featcache.errors import FeatcacheError

__all__ = ["check_device_name"]


def check_device_name(device: str) -> None:
    """Refuse anything but "auto", "cpu", "cuda" or "cuda:N" (whether CUDA exists is
    ``featcache.extract.resolve_device``'s question)."""
    kind, _, index = device.partition(":")
    if device not in ("auto", "cpu", "cuda") and not (kind == "cuda" and index.isdigit()):
        raise FeatcacheError(
            f"Expected --device auto, cpu, cuda or cuda:N. Got {device!r} instead."
        )
