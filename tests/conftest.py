"""Shared fixtures. The hub is off in tests: a stray pretrained download fails at once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import featcache  # noqa: E402,F401  (applies the torchvision import fix before timm loads)

torch.set_num_threads(min(2, torch.get_num_threads()))

# One entry per adapter family, tiny and random-init, LayerScale away from 1e-5 where the
# architecture has it. (id, name, load_encoder kwargs, expected prefix, expected grid)
FAMILIES = [
    ("dinov2", "dinov2-tiny", {}, ("cls",), (8, 8)),
    (
        "dinov2-reg",
        "timm:vit_small_patch14_reg4_dinov2",
        dict(random_init=True, img_size=56, depth=4, embed_dim=64, num_heads=2, init_values=0.5),
        ("cls", "reg0", "reg1", "reg2", "reg3"),
        (4, 4),
    ),
    ("dinov3", "dinov3-tiny", {}, ("cls", "reg0", "reg1", "reg2", "reg3"), (8, 8)),
    ("siglip2", "siglip2-tiny", {}, (), (8, 8)),
    (
        "clip-timm",
        "timm:vit_base_patch16_clip_224.openai",
        dict(random_init=True, img_size=64, depth=4, embed_dim=64, num_heads=2),
        ("cls",),
        (4, 4),
    ),
    ("clip-open_clip", "clip-tiny", {}, ("cls",), (8, 8)),
    (
        "siglip2-open_clip",
        "open_clip:ViT-B-16-SigLIP2@webli",
        dict(random_init=True, img_size=64, depth=4, embed_dim=64, num_heads=2),
        (),
        (4, 4),
    ),
]
FAMILY_IDS = [f[0] for f in FAMILIES]


@pytest.fixture(scope="session")
def encoder_cache():
    """Load each family once per session (loading is the slow part of these tests)."""
    cache: dict[str, featcache.Encoder] = {}

    def get(family_id: str) -> featcache.Encoder:
        if family_id not in cache:
            _, name, kwargs, _, _ = next(f for f in FAMILIES if f[0] == family_id)
            cache[family_id] = featcache.load_encoder(name, **kwargs)
        return cache[family_id]

    return get
