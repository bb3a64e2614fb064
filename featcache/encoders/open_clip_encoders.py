"""Adapters over open_clip's visual towers.

Native ``VisionTransformer`` (OpenAI CLIP, ``transformer.resblocks``):
  layer 0 = ln_pre(patch_dropout(conv1 patches + class token + positional_embedding))
  layer n = resblocks[n-1](layer n-1)
  final   = ln_post(layer N)                                   all T tokens, CLS first
  pooled  = visual(x): the tower's own ``_pool`` (ln_post then CLS / avg) followed by ``@ proj``

``TimmModel`` (SigLIP2 as open_clip builds it, ``visual.trunk`` is a timm ViT):
  tokens and final as the timm adapter on the trunk; pooled = head(trunk.forward_head(final)),
  i.e. exactly ``visual(x)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featcache.encoders.base import Encoder
from featcache.encoders.timm_encoders import TimmEvaEncoder, TimmViTEncoder
from featcache.preprocess import Preprocessing

__all__ = ["OpenClipViTEncoder", "OpenClipTimmViTEncoder", "wrap_open_clip_visual"]


class OpenClipViTEncoder(Encoder):
    """open_clip's own ``VisionTransformer`` (one CLS token, no registers)."""

    family = "open_clip-vit"

    def __init__(
        self, visual: nn.Module, *, name: str, spec: dict[str, Any], preprocessing: Preprocessing
    ) -> None:
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError(
                f"Expected an open_clip VisionTransformer without attentional pooling for {name}; "
                "CoCa-style towers replace the token sequence and cannot be stitched."
            )
        height, width = visual.grid_size
        super().__init__(
            name=name,
            module=visual,
            blocks=list(visual.transformer.resblocks),
            width=visual.transformer.width,
            preprocessing=preprocessing,
            has_cls=True,
            num_registers=0,
            grid=(height, width),
            pooling=f"{visual.pool_type}" + ("+proj" if visual.proj is not None else ""),
            spec=spec,
        )
        self._batch_first = getattr(visual.transformer, "batch_first", True)

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.module._embeds(images), None  # (B, T, D)

    def _block(
        self, index: int, tokens: torch.Tensor, context: Any, block: nn.Module | None = None
    ) -> torch.Tensor:
        block = block or self._blocks[index]
        if self._batch_first:
            return block(tokens)
        return block(tokens.transpose(0, 1)).transpose(0, 1)

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.ln_post(tokens)

    def _pool(self, tokens: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.module._pool(tokens)
        if self.module.proj is not None:
            pooled = pooled @ self.module.proj
        return pooled


class OpenClipTimmViTEncoder(Encoder):
    """open_clip ``TimmModel`` whose trunk is a timm ViT or Eva (SigLIP2 in open_clip)."""

    family = "open_clip-timm"

    def __init__(
        self, visual: nn.Module, *, name: str, spec: dict[str, Any], preprocessing: Preprocessing
    ) -> None:
        from timm.models.eva import Eva

        trunk = visual.trunk
        inner_cls = TimmEvaEncoder if isinstance(trunk, Eva) else TimmViTEncoder
        inner = inner_cls(trunk, name=name, spec=spec, preprocessing=preprocessing)
        super().__init__(
            name=name,
            module=visual,
            blocks=list(trunk.blocks),
            width=trunk.embed_dim,
            preprocessing=preprocessing,
            has_cls=inner.layout.has_cls,
            num_registers=inner.layout.num_registers,
            grid=inner.grid,
            pooling=inner.pooling + ("" if len(visual.head) == 0 else "+head"),
            spec=spec,
        )
        self._inner = [inner]  # a list: not a registered submodule, weights counted once

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self._inner[0]._embed(images)

    def _context(self, grid: tuple[int, int], tokens: torch.Tensor) -> Any:
        return self._inner[0]._context(grid, tokens)

    def _block(
        self, index: int, tokens: torch.Tensor, context: Any, block: nn.Module | None = None
    ) -> torch.Tensor:
        return self._inner[0]._block(index, tokens, context, block)

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.trunk.norm(tokens)

    def _pool(self, tokens: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return self.module.head(self.module.trunk.forward_head(final))


def wrap_open_clip_visual(
    visual: nn.Module, *, name: str, spec: dict[str, Any], preprocessing: Preprocessing
) -> Encoder:
    """Pick the adapter for an open_clip visual tower."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, TimmModel):
        return OpenClipTimmViTEncoder(visual, name=name, spec=spec, preprocessing=preprocessing)
    if isinstance(visual, VisionTransformer):
        return OpenClipViTEncoder(visual, name=name, spec=spec, preprocessing=preprocessing)
    raise TypeError(
        f"Expected an open_clip VisionTransformer or TimmModel tower for {name}. "
        f"Got {type(visual).__name__}: only ViT token sequences can be stitched."
    )
