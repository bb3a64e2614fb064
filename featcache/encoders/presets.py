"""Named encoders: the paper's VFMs at its resolutions, smaller variants, and tiny test models.

The paper's presets all give a 24x24 patch grid: DINOv2-L/14 and CLIP-L/14 at 336 px,
SigLIP2-L/16 and DINOv3-L/16 at 384 px. DINOv3 pools with its CLS token, as upstream DINOv3
does (timm's default for the architecture is "avg").

Every preset uses one shared geometry, ``SHARED_GEOMETRY``: resize the shorter side to the
model's own input size and keep all of it (centre crop, crop_pct 1.0). Stitching pairs token
(i, j) of one model with token (i, j) of another, so both must see the same pixels; each
model keeps its own input size, interpolation and normalisation. The geometry is an override
(``preset.overrides``), so it is recorded in the encoder spec and in the fingerprint. DINOv2,
DINOv3 and CLIP evaluate this way anyway; SigLIP2's timm config crops 0.9 (``featcache
extract --crop-pct 0.9`` restores it, for every model of the run).

Tiny presets are random-init, seeded, few blocks and small width: the same architectures
(patch sizes, prefix tokens, pooling, RoPE) at toy size, for the demo and the tests. Their
LayerScale starts at 0.5, far from DINO's 1e-5, and every Linear weight is drawn with
std 1/sqrt(fan_in) instead of timm's 0.02, so that every block changes the tokens.

Each preset also states its ``Architecture`` (depth, width, prefix tokens, patch grid, input
size, pooling), so ``featcache models`` and ``stitchtrain positions`` answer without importing
torch; tests/test_consistency.py checks every one against the model built on the meta device
(``featcache.encoders.describe_preset``). This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Architecture", "Preset", "PRESETS", "SHARED_GEOMETRY", "preset_summary"]


@dataclass(frozen=True)
class Architecture:
    """A preset's shape as its library builds it (``Encoder`` attributes of the same names).

    Attributes:
        depth: N, the number of blocks.
        width: D, the token width.
        prefix: the prefix tokens before the patches (``"cls"``, ``"reg0"``, ...).
        grid: the patch grid (rows, columns) at ``image_size``.
        image_size: the input (height, width) in pixels.
        pooling: how the pooled output is made (``"token"``: CLS, ``"map"``: attention pool,
            ``"tok+proj"``: CLS then projection).
    """

    depth: int
    width: int
    prefix: tuple[str, ...]
    grid: tuple[int, int]
    image_size: tuple[int, int]
    pooling: str


@dataclass(frozen=True)
class Preset:
    """A named encoder: library, model (with pretrained tag) and architecture overrides.

    Attributes:
        name: the preset name users type (``dinov2-l``).
        library: ``"timm"`` or ``"open_clip"``.
        model: timm ``name.tag`` or open_clip ``Name@tag``.
        overrides: architecture kwargs passed to the library (img_size, depth, ...), and the
            geometry (``resize_mode``, ``crop_pct``) replacing the pretrained eval geometry.
        tiny: random-init toy model; never needs weights.
        about: one line for ``featcache models``.
        arch: the architecture the model is built with (None for a library name that is no
            preset: only building it tells).
    """

    name: str
    library: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False
    about: str = ""
    arch: Architecture | None = None


# The geometry every preset extracts with (see the module docstring): shared, so that paired
# tokens cover the same pixels.
SHARED_GEOMETRY: dict[str, Any] = {"resize_mode": "shortest", "crop_pct": 1.0}


CLS = ("cls",)
CLS_REG4 = ("cls", "reg0", "reg1", "reg2", "reg3")


def _arch(depth: int, width: int, prefix: tuple[str, ...], size: int, patch: int, pooling: str):
    """A square input of ``size`` pixels cut into ``patch``-pixel patches."""
    side = size // patch
    return Architecture(depth, width, prefix, (side, side), (size, size), pooling)


def _timm(name: str, model: str, about: str, arch: Architecture, **overrides: Any) -> Preset:
    overrides = {**overrides, **SHARED_GEOMETRY}
    return Preset(name, "timm", model, overrides, about=about, arch=arch)


def _open_clip(name: str, model: str, about: str, arch: Architecture, **overrides: Any) -> Preset:
    overrides = {**overrides, **SHARED_GEOMETRY}
    return Preset(name, "open_clip", model, overrides, about=about, arch=arch)


def _tiny(
    name: str, library: str, model: str, about: str, arch: Architecture, **overrides: Any
) -> Preset:
    overrides = {**overrides, **SHARED_GEOMETRY}
    return Preset(name, library, model, overrides, tiny=True, about=about, arch=arch)


_TINY_VIT = dict(depth=6, num_heads=4)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # DINOv2 (timm VisionTransformer, CLS, LayerScale), 336 px -> 24x24
        _timm(
            "dinov2-s",
            "vit_small_patch14_dinov2.lvd142m",
            "DINOv2 ViT-S/14",
            _arch(12, 384, CLS, 336, 14, "token"),
            img_size=336,
        ),
        _timm(
            "dinov2-b",
            "vit_base_patch14_dinov2.lvd142m",
            "DINOv2 ViT-B/14",
            _arch(12, 768, CLS, 336, 14, "token"),
            img_size=336,
        ),
        _timm(
            "dinov2-l",
            "vit_large_patch14_dinov2.lvd142m",
            "DINOv2 ViT-L/14",
            _arch(24, 1024, CLS, 336, 14, "token"),
            img_size=336,
        ),
        # DINOv2 with 4 registers
        _timm(
            "dinov2-reg-s",
            "vit_small_patch14_reg4_dinov2.lvd142m",
            "DINOv2-reg S/14",
            _arch(12, 384, CLS_REG4, 336, 14, "token"),
            img_size=336,
        ),
        _timm(
            "dinov2-reg-b",
            "vit_base_patch14_reg4_dinov2.lvd142m",
            "DINOv2-reg B/14",
            _arch(12, 768, CLS_REG4, 336, 14, "token"),
            img_size=336,
        ),
        _timm(
            "dinov2-reg-l",
            "vit_large_patch14_reg4_dinov2.lvd142m",
            "DINOv2-reg L/14",
            _arch(24, 1024, CLS_REG4, 336, 14, "token"),
            img_size=336,
        ),
        # DINOv3 (timm Eva: RoPE, CLS + 4 registers), 384 px -> 24x24
        _timm(
            "dinov3-s",
            "vit_small_patch16_dinov3.lvd1689m",
            "DINOv3 ViT-S/16",
            _arch(12, 384, CLS_REG4, 384, 16, "token"),
            img_size=384,
            global_pool="token",
        ),
        _timm(
            "dinov3-b",
            "vit_base_patch16_dinov3.lvd1689m",
            "DINOv3 ViT-B/16",
            _arch(12, 768, CLS_REG4, 384, 16, "token"),
            img_size=384,
            global_pool="token",
        ),
        _timm(
            "dinov3-l",
            "vit_large_patch16_dinov3.lvd1689m",
            "DINOv3 ViT-L/16",
            _arch(24, 1024, CLS_REG4, 384, 16, "token"),
            img_size=384,
            global_pool="token",
        ),
        # SigLIP2 (timm VisionTransformer, no CLS, MAP attention pooling), 384 px -> 24x24
        _timm(
            "siglip2-b",
            "vit_base_patch16_siglip_384.v2_webli",
            "SigLIP2 ViT-B/16 (timm)",
            _arch(12, 768, (), 384, 16, "map"),
        ),
        _timm(
            "siglip2-l",
            "vit_large_patch16_siglip_384.v2_webli",
            "SigLIP2 ViT-L/16 (timm)",
            _arch(24, 1024, (), 384, 16, "map"),
        ),
        # CLIP (open_clip native VisionTransformer: ln_pre, ln_post, proj)
        _open_clip(
            "clip-b",
            "ViT-B-16@openai",
            "OpenAI CLIP ViT-B/16, 224 px",
            _arch(12, 768, CLS, 224, 16, "tok+proj"),
        ),
        _open_clip(
            "clip-l",
            "ViT-L-14-336@openai",
            "OpenAI CLIP ViT-L/14, 336 px",
            _arch(24, 1024, CLS, 336, 14, "tok+proj"),
        ),
        # tiny random-init models of the same architectures
        _tiny(
            "dinov2-tiny",
            "timm",
            "vit_small_patch14_dinov2",
            "DINOv2 arch, toy size",
            _arch(6, 96, CLS, 112, 14, "token"),
            img_size=112,
            embed_dim=96,
            init_values=0.5,
            **_TINY_VIT,
        ),
        _tiny(
            "dinov3-tiny",
            "timm",
            "vit_small_patch16_dinov3",
            "DINOv3 arch (RoPE, 4 reg), toy",
            _arch(6, 128, CLS_REG4, 128, 16, "token"),
            img_size=128,
            embed_dim=128,
            init_values=0.5,
            global_pool="token",
            **_TINY_VIT,
        ),
        _tiny(
            "siglip2-tiny",
            "timm",
            "vit_base_patch16_siglip_384",
            "SigLIP2 arch (MAP pool), toy",
            _arch(6, 128, (), 128, 16, "map"),
            img_size=128,
            embed_dim=128,
            **_TINY_VIT,
        ),
        _tiny(
            "clip-tiny",
            "open_clip",
            "ViT-B-16",
            "OpenAI CLIP arch (open_clip native), toy",
            _arch(6, 96, CLS, 112, 14, "tok+proj"),
            image_size=112,
            patch_size=14,
            width=96,
            layers=6,
            head_width=24,
            output_dim=64,
        ),
    ]
}


def preset_summary(name: str) -> dict[str, Any]:
    """What ``featcache models`` lists about preset ``name``, without importing torch: the
    ``describe_preset`` keys name, model, depth, width, prefix, grid, image_size, pooling,
    weights and about (``describe_preset`` builds the model on the meta device and adds the
    preprocessing and geometry)."""
    preset = PRESETS[name]
    arch = preset.arch
    return {
        "name": name,
        "model": f"{preset.library}:{preset.model}",
        "depth": arch.depth,
        "width": arch.width,
        "prefix": arch.prefix,
        "grid": arch.grid,
        "image_size": arch.image_size,
        "pooling": arch.pooling,
        "weights": "random (seeded)" if preset.tiny else "hub or --weights",
        "about": preset.about,
    }
