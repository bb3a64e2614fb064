"""featcache: run frozen vision foundation models once, cache their token features in Zarr v3.

Importing ``featcache`` is cheap: the encoder API (``Encoder``, ``TokenLayout``, ``PRESETS``,
``load_encoder``, ``Preprocessing``) is imported on first access, so the store and the CLI's
``--help`` never load torch. Every module that imports torchvision, timm or open_clip imports
``featcache._compat`` (the torchvision import fix) first itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from featcache.errors import (
    BadImageError,
    FeatcacheError,
    LayerIndexError,
    UnknownModelError,
    WeightsUnavailableError,
)
from featcache.version import __version__

if TYPE_CHECKING:
    from featcache.encoders import PRESETS, Encoder, TokenLayout, load_encoder
    from featcache.preprocess import Preprocessing

# Attribute -> the module it is imported from on first access (that module imports torch).
_LAZY = {
    "PRESETS": "featcache.encoders",
    "Encoder": "featcache.encoders",
    "TokenLayout": "featcache.encoders",
    "load_encoder": "featcache.encoders",
    "Preprocessing": "featcache.preprocess",
}

__all__ = [
    "PRESETS",
    "Encoder",
    "TokenLayout",
    "Preprocessing",
    "load_encoder",
    "FeatcacheError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "LayerIndexError",
    "BadImageError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
