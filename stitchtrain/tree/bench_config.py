"""What ``stitchtrain tree bench`` measures (``BenchConfig``) and its precisions."""

from __future__ import annotations

from dataclasses import dataclass, field

from featcache.errors import FeatcacheError
from stitchtrain.model.stitches import STITCH_KINDS

__all__ = ["BenchConfig", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "amp-bf16")


@dataclass
class BenchConfig:
    """What ``stitchtrain tree bench`` measures; CLI options map onto these fields.

    Either ``tree`` (a saved tree dir: its trunk and branch encoders, its trained stitches at
    its own position) or ``encoders`` (two or more names, the first is the trunk; random
    stitches of kind ``stitch``). ``positions`` defaults to the tree's position.
    ``readout_layer`` (R, every system read at layer R; positions below it) defaults to the
    tree's, or N in ``encoders`` mode.
    """

    encoders: list[str] = field(default_factory=list)
    tree: str | None = None
    positions: tuple[int, ...] = ()
    batch_sizes: tuple[int, ...] = (1, 32)
    warmup: int = 3
    repeats: int = 10
    device: str = "auto"
    precision: str = "fp32"
    stitch: str = "mlp"
    weights: dict[str, str] = field(default_factory=dict)
    random_init: bool = False
    readout_layer: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.positions = tuple(int(n) for n in self.positions)
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        checks = [
            (bool(self.tree) != bool(self.encoders), "a TREE_DIR or --encoder names, not both"),
            (self.tree or len(self.encoders) >= 2, "at least two --encoder names (trunk first)"),
            (self.tree or self.positions, "--positions for --encoder mode, e.g. 6,14,22"),
            (self.batch_sizes and min(self.batch_sizes) >= 1, "--batch-sizes >= 1"),
            (self.warmup >= 0 and self.repeats >= 1, "--warmup >= 0 and --repeats >= 1"),
            (self.precision in PRECISIONS, f"--precision in {PRECISIONS}"),
            (self.stitch in STITCH_KINDS, f"--stitch in {STITCH_KINDS}"),
            (self.readout_layer is None or self.readout_layer >= 2, "--readout-layer >= 2"),
            (
                self.readout_layer is None or all(n < self.readout_layer for n in self.positions),
                f"--positions below --readout-layer {self.readout_layer} (a branch runs blocks "
                f"n+1..{self.readout_layer})",
            ),
        ]
        for ok, expected in checks:
            if not ok:
                raise FeatcacheError(f"Expected {expected}. Got {self._given()} instead.")

    def _given(self) -> str:
        return (
            f"tree={self.tree!r}, encoders={self.encoders}, positions={self.positions}, "
            f"batch_sizes={self.batch_sizes}, warmup={self.warmup}, repeats={self.repeats}, "
            f"precision={self.precision!r}, stitch={self.stitch!r}, "
            f"readout_layer={self.readout_layer!r}"
        )
