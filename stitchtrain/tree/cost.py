"""The paper's additional-cost formula of a VFM Stitch Tree (Table 13)."""

from __future__ import annotations

__all__ = ["additional_cost"]


def additional_cost(num_encoders: int, position: int, depth: int) -> float:
    """Paper Table 13: extra compute of a k-encoder tree relative to one encoder.

    With k encoders read at layer L (the readout layer: every system runs blocks up to L)
    sharing blocks 1..n, the tree runs n + k (L - n) blocks instead of one encoder's L, so the
    additional cost is (k - 1)(L - n) / L. ``position=0`` is the naive system ("Full":
    (k - 1) L / L = k - 1). The paper takes L = 23 (MLLMs read layer 23 of a 24-block ViT-L):
    k=2 gives 9 / 23 = 39% (VST-14) and 1 / 23 = 4.3% (VST-22); k=4, n=14 gives 27 / 23 = 117%.
    """
    if num_encoders < 1 or not 0 <= position <= depth:
        raise ValueError(
            f"Expected num_encoders >= 1 and 0 <= position <= depth ({depth}). "
            f"Got num_encoders={num_encoders}, position={position} instead."
        )
    return (num_encoders - 1) * (depth - position) / depth
