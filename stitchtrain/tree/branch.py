"""One branch of a VFM Stitch Tree (``TreeBranch``: a stitch from the trunk, then its encoder's
tail) and the block helpers the tree shares: running blocks start+1..stop, freeing blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from featcache.encoders import Encoder
from stitchtrain.data.positions import describe_range, valid_positions
from stitchtrain.model.stitches import Stitch
from stitchtrain.tree.errors import TreeError

__all__ = ["TreeBranch"]


def _run_blocks(encoder: Encoder, tokens: Tensor, start: int, stop: int) -> Tensor:
    """Layer-``start`` tokens ``(B, T, D)`` -> layer-``stop`` tokens through blocks
    start+1..stop: the loop of ``Encoder.run_from`` (one block context, e.g. RoPE tables), without
    the final norm and pool, which only follow block N."""
    context = encoder._context(encoder.grid, tokens)
    for index in range(start, stop):
        tokens = encoder._block(index, tokens, context)
    return tokens


def _free_blocks(encoder: Encoder, blocks: Sequence[int]) -> None:
    """Release the weights of ``blocks`` (zero-size tensors keep the module structure).

    Done in place, after the fingerprint is cached: the encoder can then only run the blocks
    it still holds (blocks 1..n freed: ``run_from(tokens, m)`` for m >= n).
    """
    encoder.fingerprint  # noqa: B018  (computed and cached while the weights still exist)
    for n in blocks:
        for module in encoder.block(n).modules():
            for key, tensor in module._parameters.items():
                if tensor is not None and tensor.numel():
                    module._parameters[key] = nn.Parameter(tensor.new_empty(0), False)
            for key, tensor in module._buffers.items():
                if tensor is not None and tensor.numel():
                    module._buffers[key] = tensor.new_empty(0)


# -- branches ---------------------------------------------------------------------------------
class TreeBranch(nn.Module):
    """One branch: a stitch into ``encoder`` at ``position``, then that encoder's tail.

    ``forward(trunk_tokens, readout_layer=None)``: trunk tokens ``(B, T0, D0)`` (layer n;
    layer n-1 for a LoRA stitch) -> ``(final (B, T, D), pooled (B, D'))`` of ``encoder``: the
    stitch maps them to the encoder's layer-n layout ``(B, T, D)``, then blocks n+1..N, the
    final norm and the pool run. With ``readout_layer`` R: blocks n+1..R only, and the layer-R
    tokens ``(B, T, D)`` are returned.

    Attributes:
        name: the output key in the tree.
        encoder: the branch encoder (frozen).
        stitch: its stitch from the trunk (trainable when fine-tuned inside another model).
        position: the stitch position n.
        provenance: where it came from (run dir, stores), recorded in tree.json.
    """

    def __init__(
        self,
        name: str,
        encoder: Encoder,
        stitch: Stitch,
        position: int,
        *,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not name or not isinstance(name, str):
            raise TreeError(f"Expected a non-empty branch name. Got {name!r} instead.")
        if stitch.target != encoder.layout or stitch.target_width != encoder.width:
            raise TreeError(
                f"Branch {name!r}: the stitch produces prefix={stitch.target.prefix}, "
                f"grid={stitch.target.grid}, width {stitch.target_width}, but {encoder.name} "
                f"takes prefix={encoder.layout.prefix}, grid={encoder.grid}, width "
                f"{encoder.width}."
            )
        # stitchtrain.data.positions' rule with this encoder as the target; the trunk's depth (the
        # source side of the rule) is checked by StitchTree, which knows the trunk
        allowed = valid_positions(source_depth=encoder.depth, target_depth=encoder.depth)
        if position not in allowed:
            raise TreeError(
                f"Branch {name!r}: position {position} is outside {describe_range(allowed)} for "
                f"{encoder.name} (at least one of its blocks must run after the stitch)."
            )
        self.name = name
        self.encoder = encoder
        self.stitch = stitch
        self.position = int(position)
        self.provenance = dict(provenance or {})
        self.pruned = False

    @property
    def is_lora(self) -> bool:
        """True when the stitch consumes trunk layer n-1 (and runs its own copy of block n)."""
        return self.stitch.kind == "lora"

    def forward(
        self, trunk_tokens: Tensor, readout_layer: int | None = None
    ) -> tuple[Tensor, Tensor] | Tensor:
        stitched = self.stitch(trunk_tokens)  # (B, T, D), the encoder's layer n
        if readout_layer is None:
            return self.encoder.run_from(stitched, self.position)
        return _run_blocks(self.encoder, stitched, self.position, readout_layer)

    def prune(self, readout_layer: int | None = None) -> None:
        """Free the encoder's blocks 1..n (and R+1..N with a readout layer R), which the tree
        never runs."""
        if not self.pruned:
            tail = range(readout_layer + 1, self.encoder.depth + 1) if readout_layer else ()
            _free_blocks(self.encoder, [*range(1, self.position + 1), *tail])
            self.pruned = True

    def extra_repr(self) -> str:
        return f"name={self.name!r}, position={self.position}, kind={self.stitch.kind}"
