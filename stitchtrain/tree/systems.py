"""The systems ``tree bench`` compares: the naive system (every encoder in full), the templates
of each system before it is copied to the device, random branches, and random inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from featcache.encoders import Encoder
from stitchtrain.model.stitches import build_stitch
from stitchtrain.tree.branch import TreeBranch

__all__ = ["NaiveSystem"]


# -- systems -------------------------------------------------------------------------------------
class _ReadAt(nn.Module):
    """One encoder of the naive system: its final output (``upto`` None) or its layer ``upto``.

    A module of its own so that the FLOP counter attributes the encoder's work to it even where
    ``Encoder.run`` (not the encoder's forward) runs the blocks."""

    def __init__(self, encoder: Encoder, upto: int | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.upto = upto

    def forward(self, images: Tensor) -> Any:
        if self.upto is None:
            return self.encoder(images)  # (final, pooled)
        return self.encoder.run(images, upto=self.upto)  # layer-R tokens (B, T, D)


class NaiveSystem(nn.Module):
    """Every encoder in full on its own input: ``{name: images (B, 3, H_i, W_i)}`` ->
    ``{name: (final, pooled)}``. The baseline a tree replaces (paper: "Naive", "Full").

    With ``readout_layer`` R below some encoder's depth, every encoder runs blocks 1..R and
    ``{name: layer-R tokens}`` is returned, as a ``VFMStitchTree`` with that readout layer does.
    """

    def __init__(
        self,
        names: Sequence[str],
        encoders: Sequence[Encoder],
        readout_layer: int | None = None,
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.reads_final = readout_layer is None or {e.depth for e in encoders} == {readout_layer}
        self.readout_layer = readout_layer
        upto = None if self.reads_final else readout_layer
        self.readers = nn.ModuleList(_ReadAt(encoder, upto) for encoder in encoders)

    @property
    def encoders(self) -> list[Encoder]:
        return [reader.encoder for reader in self.readers]

    def layers_read(self, encoder: Encoder) -> int:
        """The layer ``encoder`` is read at: R, or its depth N."""
        return encoder.depth if self.reads_final else self.readout_layer

    def forward(self, images: dict[str, Tensor]) -> dict[str, Any]:
        return {
            name: reader(images[name])
            for name, reader in zip(self.names, self.readers, strict=True)
        }


@dataclass
class _Template:
    """A system before it is copied to the device: its label, position and module (on the CPU)."""

    label: str
    position: int | None
    module: nn.Module


def _random_branches(
    trunk: Encoder,
    names: Sequence[str],
    encoders: Sequence[Encoder],
    position: int,
    args: Sequence[dict[str, Any]],
    seed: int,
) -> list[TreeBranch]:
    """Branches at ``position`` with seeded random stitches of the given kinds."""
    torch.manual_seed(seed)
    branches = []
    for name, encoder, stitch in zip(names, encoders, args, strict=True):
        lora = stitch["kind"] == "lora"
        built = build_stitch(
            stitch["kind"],
            source=trunk.layout,
            target=encoder.layout,
            source_width=trunk.width,
            target_width=encoder.width,
            mlp_hidden=stitch.get("mlp_hidden"),
            source_encoder=trunk if lora else None,
            position=position,
            lora_rank=stitch.get("lora_rank") or 8,
            lora_alpha=stitch.get("lora_alpha"),
        )
        branches.append(TreeBranch(name, encoder, built, position))
    return branches


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _inputs(system: nn.Module, batch: int, device, dtype) -> Any:
    """Random preprocessed images of the right size(s) for ``system``, on the device."""
    generator = torch.Generator().manual_seed(batch)

    def images(encoder: Encoder) -> Tensor:
        return torch.randn(batch, 3, *encoder.image_size, generator=generator).to(device, dtype)

    if isinstance(system, NaiveSystem):
        return {name: images(e) for name, e in zip(system.names, system.encoders, strict=True)}
    return images(system.trunk)
