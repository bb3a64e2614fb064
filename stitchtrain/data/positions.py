"""Where a source encoder can be stitched into a target: the one rule every command uses.

Stitching at position n runs source blocks 1..n, the stitch S, then target blocks n+1..N_t
(paper section 3.1)::

    F(x) = T_t^N( S( R_s^n(x) ) )      R_s^n = source blocks 1..n,  T_t^N = target blocks n+1..N_t

so n needs n source blocks (n <= N_s) and a target tail of at least one block (n <= N_t - 1).
At n = N_t the tail is empty and F = final_norm(S(R_s^N)): FFM's loss
``||T^N(S(A_s^n)) - T^N(A_t^n)||^2`` becomes LFM at layer N_t seen through the final norm, TLT
trains a head on mapped source features, and no target block takes part, so nothing is stitched.
The rule is the same for every objective (LFM, FFM, TLT and their two-stage recipes) and every
stitch kind: a LoRA stitch at n adapts source block n, reads source layer n-1 (layer 0 at n = 1)
and feeds the same target tail. Hence::

    valid positions = 1 .. min(N_s, N_t - 1)

``stitchtrain positions`` prints this range, ``fit``
(``stitchtrain.data.pairing.check_pair``, run by ``fit``, ``fit --dry-run`` and every sweep
point) and ``sweep`` (``plan_sweep``, before any point runs) refuse a position outside it
with the message of ``check_position``.

A pair of stores narrows the range to the positions whose arrays both hold
(``needed_arrays``, checked by ``check_pair``)::

    source  layers/n (lora: layers/n-1)
    target  layers/n for LFM, final for FFM (pooled with --pooled-only), nothing more for TLT

``positions_with_arrays`` lists them; ``stitchtrain positions SOURCE_STORE TARGET_STORE``
prints them, and ``fit`` names them when it refuses a position whose layer is not stored.
"""

from __future__ import annotations

from featcache.errors import FeatcacheError

__all__ = [
    "PositionError",
    "valid_positions",
    "check_position",
    "describe_range",
    "source_array",
    "needed_arrays",
    "positions_with_arrays",
]


class PositionError(FeatcacheError, ValueError):
    """A stitch position outside ``valid_positions`` for the encoders' depths."""


def valid_positions(source_depth: int, target_depth: int) -> range:
    """The stitch positions n = 1 .. min(source_depth, target_depth - 1) (empty when the target
    has a single block)."""
    return range(1, min(int(source_depth), int(target_depth) - 1) + 1)


def describe_range(positions: range) -> str:
    """ "1..5", or "none" for an empty range."""
    return f"{positions.start}..{positions.stop - 1}" if positions else "none"


def check_position(
    position: int, source_depth: int, target_depth: int, source: str, target: str
) -> None:
    """Raise ``PositionError`` naming the valid range when ``position`` is outside it."""
    positions = valid_positions(source_depth, target_depth)
    if position not in positions:
        raise PositionError(
            f"Expected a stitch position in {describe_range(positions)} for {source} -> {target} "
            f"(source blocks 1..n, the stitch, then target blocks n+1..{target_depth}: n <= "
            f"{source_depth} source blocks and at least one target block after the stitch). "
            f"Got {position} instead."
        )


def source_array(stitch: str, position: int) -> str:
    """The source array a stitch consumes: layer n, or layer n-1 for a LoRA stitch."""
    return f"layers/{position - 1 if stitch == 'lora' else position}"


def needed_arrays(
    position: int, stitch: str, objective: str, *, pooled_only: bool = False
) -> list[tuple[str, str, str]]:
    """(role: "source" or "target", array, what reads it) for each feature array a ``stitch``
    at ``position`` trained by ``objective`` (e.g. "ffm+tlt") reads."""
    needs = [("source", source_array(stitch, position), f"a {stitch} stitch at {position}")]
    stages = objective.split("+")
    if "lfm" in stages:
        needs.append(("target", f"layers/{position}", "LFM"))
    if "ffm" in stages:
        needs.append(("target", "pooled" if pooled_only else "final", "FFM"))
    return needs


def positions_with_arrays(
    source_depth: int,
    target_depth: int,
    arrays: dict[str, set[str]],
    *,
    stitch: str,
    objective: str,
    pooled_only: bool = False,
) -> list[int]:
    """The ``valid_positions`` at which the stores hold every array ``needed_arrays`` names;
    ``arrays``: the feature arrays each role's store holds ({"source": {"layers/2", ...}, ...})."""
    return [
        n
        for n in valid_positions(source_depth, target_depth)
        if all(
            array in arrays[role]
            for role, array, _ in needed_arrays(n, stitch, objective, pooled_only=pooled_only)
        )
    ]
