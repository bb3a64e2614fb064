"""Encoder adapters: one interface over timm and open_clip vision transformers.

``PRESETS``, ``Preset``, ``Architecture`` and ``preset_summary`` come from
``featcache.encoders.presets`` and import nothing heavy, so ``featcache models`` and
``stitchtrain positions`` list presets without torch. The rest (``Encoder``, ``TokenLayout``,
``load_encoder``, ``resolve_spec``, ``describe_preset``) is imported on first access; those
modules import torch, and ``featcache._compat`` (the torchvision import fix) before timm or
open_clip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from featcache.encoders.presets import PRESETS, Architecture, Preset, preset_summary

if TYPE_CHECKING:
    from featcache.encoders.base import Encoder, TokenLayout
    from featcache.encoders.registry import describe_preset, load_encoder, resolve_spec

# Attribute -> the module it is imported from on first access (that module imports torch).
_LAZY = {
    "Encoder": "featcache.encoders.base",
    "TokenLayout": "featcache.encoders.base",
    "load_encoder": "featcache.encoders.registry",
    "resolve_spec": "featcache.encoders.registry",
    "describe_preset": "featcache.encoders.registry",
}

__all__ = [
    "Architecture",
    "Encoder",
    "TokenLayout",
    "PRESETS",
    "Preset",
    "preset_summary",
    "load_encoder",
    "resolve_spec",
    "describe_preset",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featcache.encoders' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
