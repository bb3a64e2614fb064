"""Adapters over timm's ``VisionTransformer`` (DINOv2, DINOv2-reg, SigLIP2, CLIP) and ``Eva``
(DINOv3: RoPE, registers).

Both mirror the library's ``forward_features`` + ``forward_head(pre_logits=True)`` step by step:
  layer 0 = norm_pre(patch_drop(_pos_embed(patch_embed(x))))      (B, T, D)
  layer n = blocks[n-1](layer n-1)             (Eva: blocks[n-1](x, rope=rope(grid)))
  final   = norm(layer N)                                         (B, T, D)
  pooled  = fc_norm(pool(final))               (CLS / avg / MAP per the model's global_pool)
so ``run_from(run(x, n), n)`` equals ``model.forward_head(model.forward_features(x), True)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featcache.encoders.base import Encoder
from featcache.preprocess import Preprocessing

__all__ = ["TimmViTEncoder", "TimmEvaEncoder", "timm_preprocessing", "wrap_timm_model"]


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    """Preprocessing from the model's pretrained config at the model's actual input size."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    return Preprocessing.from_timm(config, tuple(model.patch_embed.img_size))


def _pooling_name(model: nn.Module) -> str:
    if getattr(model, "attn_pool", None) is not None:
        return "map"
    return str(model.global_pool or "none")


class TimmViTEncoder(Encoder):
    """timm ``VisionTransformer``: absolute position embedding, optional CLS / registers."""

    family = "timm-vit"

    def __init__(self, model: nn.Module, *, name: str, spec: dict[str, Any], **kwargs) -> None:
        super().__init__(
            name=name,
            module=model,
            blocks=list(model.blocks),
            width=model.embed_dim,
            preprocessing=kwargs.pop("preprocessing", None) or timm_preprocessing(model),
            has_cls=model.cls_token is not None,
            num_registers=model.num_prefix_tokens - int(model.cls_token is not None),
            grid=tuple(model.patch_embed.grid_size),
            pooling=_pooling_name(model),
            spec=spec,
        )

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        model = self.module
        tokens = model.patch_embed(images)
        tokens = model._pos_embed(tokens)
        tokens = model.patch_drop(tokens)
        return model.norm_pre(tokens), None  # (B, T, D)

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.norm(tokens)

    def _pool(self, tokens: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return self.module.forward_head(final, pre_logits=True)  # (B, D)


class TimmEvaEncoder(TimmViTEncoder):
    """timm ``Eva`` (DINOv3): blocks take ``rope=``, recomputed from the patch grid."""

    family = "timm-eva"

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        model = self.module
        tokens = model.patch_embed(images)
        tokens, rope = model._pos_embed(tokens)
        return model.norm_pre(tokens), rope

    def _context(self, grid: tuple[int, int], tokens: torch.Tensor) -> Any:
        rope_module = self.module.rope
        if rope_module is None:
            return None
        if self.module.dynamic_img_size or tuple(grid) != tuple(self.grid):
            return rope_module.get_embed(shape=list(grid))  # as Eva._pos_embed, dynamic branch
        return rope_module.get_embed()  # as Eva._pos_embed, fixed-size branch (cached table)

    def _block(
        self, index: int, tokens: torch.Tensor, context: Any, block: nn.Module | None = None
    ) -> torch.Tensor:
        rope = context
        if rope is not None and getattr(self.module, "rope_mixed", False):
            rope = rope[index]
        return (block or self._blocks[index])(tokens, rope=rope)


def wrap_timm_model(model: nn.Module, *, name: str, spec: dict[str, Any]) -> Encoder:
    """Pick the adapter for a timm model instance; reject architectures we do not cover."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, Eva):
        return TimmEvaEncoder(model, name=name, spec=spec)
    if isinstance(model, VisionTransformer):
        return TimmViTEncoder(model, name=name, spec=spec)
    raise TypeError(
        f"Expected a timm VisionTransformer or Eva for {name}. Got {type(model).__name__}: "
        "only plain ViT token sequences can be stitched."
    )
