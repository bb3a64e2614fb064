"""featcache: run frozen vision foundation models once, cache their token features in Zarr v3."""

from featcache import _compat  # noqa: F401  (must precede any timm / open_clip import)
from featcache.encoders import PRESETS, Encoder, TokenLayout, load_encoder
from featcache.errors import (
    BadImageError,
    FeatcacheError,
    LayerIndexError,
    UnknownModelError,
    WeightsUnavailableError,
)
from featcache.preprocess import Preprocessing

__version__ = "0.1.0"

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
