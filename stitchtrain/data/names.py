"""The name a user reads for an encoder, as a store's ``encoder`` attribute describes it.

A hybrid (``stitched:DIR``) is read by its label, ``source[:n]→target`` (recorded in
``encoder.hybrid.label``), never by its run dir's path or a hash; any other encoder by its
name (a preset, ``timm:...``, ``open_clip:...``). Sweep points and result rows, transfers,
Table 12 and the report name encoders by this rule.
"""

from __future__ import annotations

from typing import Any

__all__ = ["encoder_label"]


def encoder_label(described: dict[str, Any]) -> str:
    """A hybrid's ``hybrid.label``, else the encoder's ``name``."""
    return (described.get("hybrid") or {}).get("label") or described["name"]
