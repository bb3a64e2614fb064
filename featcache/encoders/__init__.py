"""Encoder adapters: one interface over timm and open_clip vision transformers."""

from featcache import _compat  # noqa: F401  (torchvision import fix, before timm / open_clip)

# isort: split
from featcache.encoders.base import Encoder, TokenLayout
from featcache.encoders.presets import PRESETS, Preset
from featcache.encoders.registry import describe_preset, load_encoder, resolve_spec

__all__ = [
    "Encoder",
    "TokenLayout",
    "PRESETS",
    "Preset",
    "load_encoder",
    "resolve_spec",
    "describe_preset",
]
