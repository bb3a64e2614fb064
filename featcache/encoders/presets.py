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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Preset", "PRESETS", "SHARED_GEOMETRY"]


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
    """

    name: str
    library: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False
    about: str = ""


# The geometry every preset extracts with (see the module docstring): shared, so that paired
# tokens cover the same pixels.
SHARED_GEOMETRY: dict[str, Any] = {"resize_mode": "shortest", "crop_pct": 1.0}


def _timm(name: str, model: str, about: str, **overrides: Any) -> Preset:
    return Preset(name, "timm", model, {**overrides, **SHARED_GEOMETRY}, about=about)


def _open_clip(name: str, model: str, about: str, **overrides: Any) -> Preset:
    return Preset(name, "open_clip", model, {**overrides, **SHARED_GEOMETRY}, about=about)


def _tiny(name: str, library: str, model: str, about: str, **overrides: Any) -> Preset:
    overrides = {**overrides, **SHARED_GEOMETRY}
    return Preset(name, library, model, overrides, tiny=True, about=about)


_TINY_VIT = dict(depth=6, num_heads=4)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # DINOv2 (timm VisionTransformer, CLS, LayerScale), 336 px -> 24x24
        _timm("dinov2-s", "vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14", img_size=336),
        _timm("dinov2-b", "vit_base_patch14_dinov2.lvd142m", "DINOv2 ViT-B/14", img_size=336),
        _timm("dinov2-l", "vit_large_patch14_dinov2.lvd142m", "DINOv2 ViT-L/14", img_size=336),
        # DINOv2 with 4 registers
        _timm(
            "dinov2-reg-s",
            "vit_small_patch14_reg4_dinov2.lvd142m",
            "DINOv2-reg S/14",
            img_size=336,
        ),
        _timm(
            "dinov2-reg-b",
            "vit_base_patch14_reg4_dinov2.lvd142m",
            "DINOv2-reg B/14",
            img_size=336,
        ),
        _timm(
            "dinov2-reg-l",
            "vit_large_patch14_reg4_dinov2.lvd142m",
            "DINOv2-reg L/14",
            img_size=336,
        ),
        # DINOv3 (timm Eva: RoPE, CLS + 4 registers), 384 px -> 24x24
        _timm(
            "dinov3-s",
            "vit_small_patch16_dinov3.lvd1689m",
            "DINOv3 ViT-S/16",
            img_size=384,
            global_pool="token",
        ),
        _timm(
            "dinov3-b",
            "vit_base_patch16_dinov3.lvd1689m",
            "DINOv3 ViT-B/16",
            img_size=384,
            global_pool="token",
        ),
        _timm(
            "dinov3-l",
            "vit_large_patch16_dinov3.lvd1689m",
            "DINOv3 ViT-L/16",
            img_size=384,
            global_pool="token",
        ),
        # SigLIP2 (timm VisionTransformer, no CLS, MAP attention pooling), 384 px -> 24x24
        _timm("siglip2-b", "vit_base_patch16_siglip_384.v2_webli", "SigLIP2 ViT-B/16 (timm)"),
        _timm("siglip2-l", "vit_large_patch16_siglip_384.v2_webli", "SigLIP2 ViT-L/16 (timm)"),
        # CLIP (open_clip native VisionTransformer: ln_pre, ln_post, proj)
        _open_clip("clip-b", "ViT-B-16@openai", "OpenAI CLIP ViT-B/16, 224 px"),
        _open_clip("clip-l", "ViT-L-14-336@openai", "OpenAI CLIP ViT-L/14, 336 px"),
        # tiny random-init models of the same architectures
        _tiny(
            "dinov2-tiny",
            "timm",
            "vit_small_patch14_dinov2",
            "DINOv2 arch, toy size",
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
            img_size=128,
            embed_dim=128,
            **_TINY_VIT,
        ),
        _tiny(
            "clip-tiny",
            "open_clip",
            "ViT-B-16",
            "OpenAI CLIP arch (open_clip native), toy",
            image_size=112,
            patch_size=14,
            width=96,
            layers=6,
            head_width=24,
            output_dim=64,
        ),
    ]
}
