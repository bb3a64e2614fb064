"""``HybridEncoder``: a trained stitch and its two frozen parents seen as one ``Encoder``.

Layer numbering (docs/design.md, "Hybrid VFMs"), for a stitch at position n into a target of
depth N (the hybrid's depth is N):

    layers 0..m      the source's layers 0..m (m = n; m = n-1 for a LoRA stitch)
    layer n (LoRA)   the stitch's output: LoRA source block n, aligned and projected
    layers n+1..N    target blocks n+1..N on the stitched tokens (block n+1 is preceded by
                     the stitch for linear / MLP stitches)
    final, pooled    the target's final norm and pooling

``run(x)`` is the run's own stitched forward (``stitches.stitched_outputs`` on source layer
n), bit for bit, and ``run_from(run(x, upto=k), k)`` equals ``run(x)`` for every k. The
hybrid's layout, width and grid are the target's (layers past the stitch, final); layers
0..m have the source's token shape, so a store of the hybrid holds them only when that
shape is the target's (``check_storable``). Preprocessing is the source's: the image enters
the source. The fingerprint chains the source fingerprint, the stitch file's SHA-256, the
stitch kind and position, the target fingerprint and the preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcache.encoders import Encoder
from featcache.errors import LayerIndexError
from stitchtrain.hybrid.errors import HybridError
from stitchtrain.hybrid.exported import is_export, parts_from_export
from stitchtrain.hybrid.parts import HybridParts, parts_from_run
from stitchtrain.model.stitches import Stitch

__all__ = ["HybridEncoder", "layer_map", "load_parts", "load_stitched"]

_GEOMETRY_KEYS = ("resize_mode", "crop_pct")


@dataclass
class _Context:
    """Per-forward contexts of both parents (RoPE tables for Eva; None otherwise)."""

    source: Any
    target: Any


class HybridEncoder(Encoder):
    """Source blocks 1..m, the stitch, target blocks n+1..N (module docstring).

    Attributes:
        source, target: the frozen parent encoders.
        stitch: the trained stitch (frozen).
        position: n; ``source_layers``: m, the last layer that is the source's.
        parts: what was loaded (names, stage, stitch digest, origin).
    """

    family = "stitched"

    def __init__(self, parts: HybridParts, *, name: str, geometry: dict[str, Any]) -> None:
        source, target, stitch = parts.source, parts.target, parts.stitch
        self.position = parts.position
        self.source_layers = parts.position - 1 if stitch.kind == "lora" else parts.position
        blocks = [source.block(k) for k in range(1, self.source_layers + 1)]
        if stitch.kind == "lora":
            blocks.append(stitch)
        blocks += [target.block(k) for k in range(parts.position + 1, target.depth + 1)]
        preprocessing = source.preprocessing
        if geometry:
            preprocessing = preprocessing.with_geometry(**geometry)
        super().__init__(
            name=name,
            module=nn.ModuleDict({"source": source, "stitch": stitch, "target": target}),
            blocks=blocks,
            width=target.width,
            preprocessing=preprocessing,
            has_cls=target.layout.has_cls,
            num_registers=target.layout.num_registers,
            grid=target.grid,
            pooling=target.pooling,
            spec={"library": "stitched", "model": parts.label, "overrides": dict(geometry)},
        )
        self.pretrained_preprocessing = source.pretrained_preprocessing
        self.parts = parts

    @property
    def source(self) -> Encoder:
        return self.module["source"]

    @property
    def target(self) -> Encoder:
        return self.module["target"]

    @property
    def stitch(self) -> Stitch:
        return self.module["stitch"]

    @property
    def patch_size(self) -> tuple[int, int]:
        """The input (the source's) over the token grid (the target's): what each output
        token covers, as the stitch's resampling by grid fraction maps it."""
        return (self.image_size[0] // self.grid[0], self.image_size[1] // self.grid[1])

    # -- the forward: the family hooks of Encoder ---------------------------------------------
    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        tokens, source_context = self.source._embed(images)
        return tokens, _Context(source_context, self.target._context(self.target.grid, tokens))

    def _context(self, grid: tuple[int, int], tokens: torch.Tensor) -> Any:
        return _Context(
            self.source._context(self.source.grid, tokens), self.target._context(grid, tokens)
        )

    def _block(
        self, index: int, tokens: torch.Tensor, context: Any, block: nn.Module | None = None
    ) -> torch.Tensor:
        """Block ``index + 1`` of the hybrid (0-based ``index``, as the base class counts)."""
        if index < self.source_layers:
            return self.source._block(index, tokens, context.source, block)
        if self.stitch.kind == "lora" and index == self.source_layers:
            return (block or self.stitch)(tokens)
        if index == self.position:  # linear / MLP: the stitch, then target block n+1
            tokens = self.stitch(tokens)
        return self.target._block(index, tokens, context.target, block)

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.target._final_norm(tokens)

    def _pool(self, tokens: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return self.target._pool(tokens, final)

    # -- what a store can hold -----------------------------------------------------------------
    @property
    def _source_tokens_fit(self) -> bool:
        """Whether the source's tokens have the hybrid's shape (then every layer is storable)."""
        source = self.source
        return source.layout.num_tokens == self.num_tokens and source.width == self.width

    def storable_layers(self, layers: list[int] | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(n for n in layers if self._source_tokens_fit or n > self.source_layers)

    def check_storable(self, layers: list[int] | tuple[int, ...]) -> None:
        super().check_storable(layers)
        source = self.source
        bad = sorted(set(layers) - set(self.storable_layers(layers)))
        if bad:
            raise LayerIndexError(
                f"Expected layers in {self.source_layers + 1}..{self.depth} for {self.name}: "
                f"layers 0..{self.source_layers} are its source's ({source.name}: "
                f"{source.layout.num_tokens} tokens of width {source.width}, not the hybrid's "
                f"{self.num_tokens} of width {self.width}; extract them from {source.name}). "
                f"Got {bad} instead."
            )

    # -- identity ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """SHA-256 (32 hex digits) over the source fingerprint, the stitch file's SHA-256, the
        stitch kind and position, the target fingerprint, the preprocessing and the layout:
        stores of two different stitches never pair."""
        if self._fingerprint is None:
            header = {
                "family": self.family,
                "source": self.source.fingerprint,
                "stitch_sha256": self.parts.stitch_sha256,
                "stitch": self.stitch.kind,
                "position": self.position,
                "target": self.target.fingerprint,
                "preprocessing": self.preprocessing.to_dict(),
                "layout": self.layout.to_dict(),
            }
            encoded = json.dumps(header, sort_keys=True).encode()
            self._fingerprint = hashlib.sha256(encoded).hexdigest()[:32]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """``Encoder.describe()`` plus ``hybrid``: the readable label, both parents' names
        and fingerprints, the stitch, its stage and digest, where layers come from, and
        ``own_layers_from``: the first layer of the hybrid's own token shape (0 when the
        source's tokens have that shape too; a stitch into the hybrid must produce such a
        layer, so it sits at a position at least that)."""
        parts = self.parts
        own = self.storable_layers(range(self.depth + 1))  # its own token shape from there on
        return {
            **super().describe(),
            "hybrid": {
                "label": parts.label,
                "source": {"name": self.source.name, "fingerprint": self.source.fingerprint},
                "target": {"name": self.target.name, "fingerprint": self.target.fingerprint},
                "position": self.position,
                "stitch": self.stitch.kind,
                "stage": parts.stage,
                "stitch_sha256": parts.stitch_sha256,
                "layers": layer_map(self.source_layers, self.position, self.depth, self.stitch),
                "own_layers_from": own[0],
            },
        }


def layer_map(source_layers: int, position: int, depth: int, stitch: Stitch) -> dict[str, Any]:
    """Where each layer of the hybrid comes from (the module docstring's table), as JSON."""
    layers: dict[str, Any] = {"source": [0, source_layers]}
    if stitch.kind == "lora":
        layers["stitch"] = position
    layers["target"] = [position + 1, depth]
    return layers


def load_parts(path: str | Path, stage: str | None, device: torch.device) -> HybridParts:
    """The parts of ``stitched:PATH[#STAGE]``: an export folder's, else a fit run dir's."""
    path = Path(path)
    if not path.is_dir():
        raise HybridError(
            f"Expected stitched:DIR to name a fit run dir or an export folder. Got {path}, "
            "which is not a directory."
        )
    if is_export(path):
        return parts_from_export(path, stage, device)
    return parts_from_run(path, stage, device)


def load_stitched(
    value: str,
    *,
    pretrained: bool | None = None,
    weights: Any = None,
    random_init: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> HybridEncoder:
    """``featcache.load_encoder("stitched:DIR[#STAGE]")``: the hybrid of a finished fit run
    dir (its best stage, the final one, unless ``#STAGE`` names one) or of an export folder.

    The parents load as the run or export recorded them (their weights, random init or hub),
    checked by fingerprint, so ``weights`` must be None; ``random_init``, ``seed`` and
    ``pretrained`` are accepted for the registry's signature and do not apply (a fit passes
    its ``--random-init`` to every store's encoder). ``resize_mode`` / ``crop_pct`` set the
    image geometry, as for any model; other overrides are refused.
    """
    del pretrained, random_init, seed  # the parents' weights are the run's (docstring)
    if weights is not None:
        raise HybridError(
            f"Expected no weights file for stitched:{value} (its parents load the weights the "
            f"run or export recorded; `stitchtrain export --with-weights` ships them). Got "
            f"{weights!s} instead."
        )
    unknown = sorted(set(overrides) - set(_GEOMETRY_KEYS))
    if unknown:
        raise HybridError(
            f"Expected only {', '.join(_GEOMETRY_KEYS)} as overrides of stitched:{value} (its "
            f"architecture is its parents'). Got {', '.join(unknown)} instead."
        )
    geometry = {k: v for k, v in overrides.items() if v is not None}
    if "crop_pct" in geometry:
        geometry["crop_pct"] = float(geometry["crop_pct"])
    path, _, stage = value.partition("#")
    device = torch.device(device)
    load_on = torch.device("cpu") if device.type == "meta" else device
    parts = load_parts(path, stage or None, load_on)
    name = f"stitched:{parts.path}" + (f"#{stage}" if stage else "")
    return HybridEncoder(parts, name=name, geometry=geometry).to(device)
