"""The one interface every encoder family implements.

Layer numbering (paper convention, docs/design.md):
  layer 0      tokens entering block 1: patch embed + prefix tokens + position embedding + pre-norm
  layer n      output of block n (the library's ``blocks[n - 1]``), 1 <= n <= N
  final        the model's final norm applied to layer N tokens (timm ``forward_features``)
  pooled       the model's own pooled output (timm ``forward_head(pre_logits=True)``; for
               open_clip the visual tower's output, i.e. after ``ln_post`` and ``proj``)

Tokens are always ``(B, T, D)`` with the prefix tokens first: T = num_prefix_tokens + H * W for
a patch grid (H, W) in row-major order. ``run(images, upto=n)`` followed by
``run_from(tokens, n)`` is the library's own forward, bit for bit (tested for every family).

Precision: forwards run in float32 unless wrapped in ``encoder.autocast(precision)``
(``PRECISIONS``: "fp32" none, "bf16" / "fp16" torch autocast on the encoder's device type,
weights stay float32); extraction records the precision in each store and its id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featcache.errors import LayerIndexError
from featcache.preprocess import Geometry, Preprocessing

__all__ = ["PRECISIONS", "Encoder", "TokenLayout", "precision_context"]

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a forward in ``precision`` runs under on ``device``: nothing for "fp32",
    ``torch.autocast(device.type, dtype)`` for "bf16" / "fp16" (CPU autocast included)."""
    if precision not in PRECISIONS:
        raise ValueError(f"Expected precision in {PRECISIONS}. Got {precision!r} instead.")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


@dataclass(frozen=True)
class TokenLayout:
    """Where each token of a ``(B, T, D)`` sequence comes from.

    Attributes:
        prefix: names of the prefix slots in order, e.g. ``("cls", "reg0", ..., "reg3")``;
            empty for models without prefix tokens (SigLIP2).
        grid: (H, W) patch grid; patches follow the prefix in row-major order.
    """

    prefix: tuple[str, ...]
    grid: tuple[int, int]

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix)

    @property
    def has_cls(self) -> bool:
        return "cls" in self.prefix

    @property
    def num_registers(self) -> int:
        return sum(name.startswith("reg") for name in self.prefix)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def to_dict(self) -> dict:
        return {"prefix": list(self.prefix), "grid": list(self.grid)}


def _prefix_names(has_cls: bool, num_registers: int) -> tuple[str, ...]:
    return (("cls",) if has_cls else ()) + tuple(f"reg{i}" for i in range(num_registers))


class Encoder(nn.Module):
    """A frozen vision transformer seen as layer 0, blocks 1..N, a final norm and a pool.

    Subclasses wrap one library module and implement ``_embed``, ``_block``, ``_final_norm``
    and ``_pool``; everything else (index checks, freezing, fingerprint) lives here.

    Attributes:
        name: the spec it was loaded from (preset, ``timm:...`` or ``open_clip:...``).
        family: adapter family, e.g. ``"timm-vit"``, ``"timm-eva"``, ``"open_clip-vit"``.
        module: the library's own model object (timm model or open_clip visual tower).
        preprocessing: how PIL images become input tensors.
        layout: prefix slots and patch grid.
        depth, width: N blocks of D channels.
        pooling: how ``pooled`` is formed ("token", "avg", "map", "token+proj", ...).
    """

    family: str = ""

    def __init__(
        self,
        *,
        name: str,
        module: nn.Module,
        blocks: list[nn.Module],
        width: int,
        preprocessing: Preprocessing,
        has_cls: bool,
        num_registers: int,
        grid: tuple[int, int],
        pooling: str,
        spec: dict[str, Any],
    ) -> None:
        super().__init__()
        self.name = name
        self.module = module
        self._blocks = list(blocks)
        self.width = int(width)
        self.preprocessing = preprocessing
        self.pretrained_preprocessing = preprocessing  # the library's own; load_encoder may
        # replace ``preprocessing``'s geometry (a preset's shared geometry, --crop-pct, ...)
        self.layout = TokenLayout(_prefix_names(has_cls, num_registers), tuple(grid))
        self.pooling = pooling
        self.spec = dict(spec)
        self.module.eval()
        self.module.requires_grad_(False)
        self._fingerprint: str | None = None
        self._pooled_width: int | None = None

    # -- geometry -----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return self.layout.num_prefix_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.grid

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocessing.image_size

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def patch_size(self) -> tuple[int, int]:
        """(height, width) of one patch in input pixels: the library's patch embedding's, else
        the input size over the grid."""
        module = getattr(self.module, "trunk", self.module)  # open_clip TimmModel: timm trunk
        size = getattr(getattr(module, "patch_embed", None), "patch_size", None)
        size = size if size is not None else getattr(module, "patch_size", None)
        if size is None:
            return (self.image_size[0] // self.grid[0], self.image_size[1] // self.grid[1])
        return (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)

    @property
    def geometry(self) -> Geometry:
        """Which original-image pixels each patch token sees (``featcache.preprocess``)."""
        return Geometry.from_preprocessing(self.preprocessing, self.grid, self.patch_size)

    def preprocess(self, image) -> torch.Tensor:
        """PIL image of any mode -> ``(3, H, W)`` float tensor, per the model's own pretrained
        config, after the EXIF orientation and RGB conversion extraction applies
        (``featcache.images.upright_rgb``)."""
        from featcache.images import upright_rgb

        return self.preprocessing(upright_rgb(image))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """``with encoder.autocast("bf16"): encoder.run_layers(...)``: see ``precision_context``."""
        return precision_context(self.device, precision)

    def train(self, mode: bool = True) -> Encoder:
        """Encoders stay in eval mode: they are frozen feature extractors (no dropout, no
        stochastic depth, no RoPE jitter). ``train()`` is accepted and ignored for the module."""
        super().train(mode)
        self.module.eval()
        return self

    # -- the forward contract -----------------------------------------------------------------
    def _check_layer(self, n: int, what: str) -> int:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.depth:
            raise LayerIndexError(
                f"Expected {what} in 0..{self.depth} for {self.name} (depth {self.depth}). "
                f"Got {n!r} instead."
            )
        return n

    def storable_layers(self, layers: list[int] | tuple[int, ...]) -> tuple[int, ...]:
        """The layers of ``layers`` whose tokens are ``(num_tokens, width)``: all of them for a
        plain encoder; a hybrid leaves out its source's when their shape differs."""
        return tuple(layers)

    def check_storable(self, layers: list[int] | tuple[int, ...]) -> None:
        """Refuse ``layers`` whose tokens are not ``(num_tokens, width)`` (a store holds one
        token shape per encoder). Every layer of a plain encoder is; a hybrid's source layers
        may not be (``stitchtrain.hybrid``)."""
        for n in layers:
            self._check_layer(n, "layer")

    def run(self, images: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Layer ``upto`` tokens ``(B, T, D)`` for preprocessed ``images`` ``(B, 3, H, W)``.

        ``upto=0`` is the embedded sequence entering block 1; ``None`` means N.
        """
        upto = self.depth if upto is None else self._check_layer(upto, "upto")
        tokens, context = self._embed(images)  # (B, T, D)
        for index in range(upto):
            tokens = self._block(index, tokens, context)
        return tokens

    def run_from(
        self, tokens: torch.Tensor, n: int, *, grid: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run blocks n+1..N on layer-n ``tokens`` ``(B, T, D)``; return ``(final, pooled)``.

        ``final`` is ``(B, T', D)`` (the model's final norm on layer N; open_clip models that
        drop the CLS token from their token output still return all T tokens here) and
        ``pooled`` is ``(B, D_out)``. Gradients flow to ``tokens``; the weights are frozen.
        ``grid`` is only needed when the tokens come from a different image size.
        """
        self._check_layer(n, "n")
        context = self._context(grid or self.grid, tokens)
        for index in range(n, self.depth):
            tokens = self._block(index, tokens, context)
        final = self._final_norm(tokens)
        return final, self._pool(tokens, final)

    def block(self, n: int) -> nn.Module:
        """The library module of block n (1-based: it maps layer n-1 to layer n)."""
        self._check_layer(n, "block")
        if n == 0:
            raise LayerIndexError(f"Expected a block in 1..{self.depth}. Got 0 instead.")
        return self._blocks[n - 1]

    def run_block(
        self,
        n: int,
        tokens: torch.Tensor,
        *,
        block: nn.Module | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Layer n-1 tokens ``(B, T, D)`` -> layer n tokens through block n.

        ``block`` substitutes a module with the library block's call signature (a LoRA-wrapped
        copy of ``self.block(n)``); RoPE and layout handling stay the encoder's own.
        """
        self.block(n)
        context = self._context(grid or self.grid, tokens)
        return self._block(n - 1, tokens, context, block)

    def run_layers(
        self, images: torch.Tensor, layers: list[int] | tuple[int, ...]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One pass returning ``({n: layer-n tokens}, final, pooled)`` for the given layers.

        Equal to ``run(images, upto=n)`` for each n and ``run_from(run(images), N)``: the
        blocks run once and the requested layers are taken on the way (what extraction uses).
        """
        for n in layers:
            self._check_layer(n, "layer")
        wanted = set(layers)
        tokens, context = self._embed(images)  # (B, T, D)
        taken = {0: tokens} if 0 in wanted else {}
        for index in range(self.depth):
            tokens = self._block(index, tokens, context)
            if index + 1 in wanted:
                taken[index + 1] = tokens
        final = self._final_norm(tokens)
        return taken, final, self._pool(tokens, final)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole encoder: ``(final, pooled)`` for preprocessed images."""
        return self.run_from(self.run(images, upto=0), 0)

    # -- family hooks ---------------------------------------------------------------------------
    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Images -> (layer-0 tokens, per-forward context such as RoPE tables)."""
        raise NotImplementedError

    def _context(self, grid: tuple[int, int], tokens: torch.Tensor) -> Any:
        """Context for running blocks on tokens of a known grid (RoPE for Eva); None otherwise."""
        return None

    def _block(
        self, index: int, tokens: torch.Tensor, context: Any, block: nn.Module | None = None
    ) -> torch.Tensor:
        return (block or self._blocks[index])(tokens)

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pool(self, tokens: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- identity -------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Stable hex digest of the weights, the architecture spec and the preprocessing.

        SHA-256 over: the spec and preprocessing as canonical JSON, then for every state-dict
        entry in sorted key order its name, dtype, shape and raw bytes. Two loads of the same
        weights agree; changing any single weight value changes it. Cached after first use.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            header = {
                "family": self.family,
                "spec": self.spec,
                "preprocessing": self.preprocessing.to_dict(),
                "layout": self.layout.to_dict(),
            }
            digest.update(json.dumps(header, sort_keys=True).encode())
            state = self.module.state_dict()
            for key in sorted(state):
                tensor = state[key].detach().cpu().contiguous()
                digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            self._fingerprint = digest.hexdigest()[:32]
        return self._fingerprint

    @property
    def pooled_width(self) -> int:
        """Channels of ``pooled`` (differs from ``width`` where a projection follows the pool)."""
        if self._pooled_width is None:
            device = next(self.module.parameters()).device
            with torch.no_grad():
                probe = torch.zeros(1, 3, *self.image_size, device=device)
                self._pooled_width = int(self(probe)[1].shape[-1])
        return self._pooled_width

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: what a store records about the encoder that wrote it."""
        return {
            "name": self.name,
            "family": self.family,
            "spec": self.spec,
            "depth": self.depth,
            "width": self.width,
            "layout": self.layout.to_dict(),
            "image_size": list(self.image_size),
            "pooling": self.pooling,
            "pooled_width": self.pooled_width,
            "preprocessing": self.preprocessing.to_dict(),
            "geometry": self.geometry.to_dict(),
            "fingerprint": self.fingerprint,
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, family={self.family}, depth={self.depth}, width={self.width}, "
            f"prefix={self.layout.prefix}, grid={self.grid}"
        )
