"""A tree's saved form (tree.json and one stitch file per branch; the format:
``stitchtrain.tree.model``): describing encoders and stitches, rebuilding them from the record,
and checking a tree dir."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from featcache.encoders import Encoder, TokenLayout, load_encoder
from stitchtrain.model.stitches import Stitch, build_stitch
from stitchtrain.tree.errors import TreeError

__all__ = ["TREE_FORMAT", "check_tree_dir", "stitch_args"]

TREE_FORMAT = "vfm-stitch-tree"
TREE_VERSION = 1
TREE_FILE = "tree.json"


# -- describing encoders and stitches ------------------------------------------------------------
def _describe_encoder(encoder: Encoder) -> dict[str, Any]:
    """What tree.json records about an encoder (no forward pass, unlike ``describe()``)."""
    return {
        "name": encoder.name,
        "spec": encoder.spec,
        "fingerprint": encoder.fingerprint,
        "depth": encoder.depth,
        "width": encoder.width,
        "layout": encoder.layout.to_dict(),
        "image_size": list(encoder.image_size),
    }


def _layout(described: Mapping[str, Any]) -> TokenLayout:
    return TokenLayout(tuple(described["prefix"]), tuple(described["grid"]))


def stitch_args(stitch: Stitch) -> dict[str, Any]:
    """The ``build_stitch`` arguments that rebuild ``stitch`` (JSON-ready, no weights)."""
    args: dict[str, Any] = {
        "kind": stitch.kind,
        "source": stitch.source.to_dict(),
        "target": stitch.target.to_dict(),
        "source_width": stitch.source_width,
        "target_width": stitch.target_width,
        "mlp_hidden": None,
        "lora_rank": None,
        "lora_alpha": None,
    }
    if stitch.kind == "mlp":
        args["mlp_hidden"] = stitch.map[0].out_features
    elif stitch.kind == "lora":
        delta = next(m for m in stitch.block.modules() if hasattr(m, "lora_A"))
        rank = int(delta.lora_A.shape[0])
        args["lora_rank"], args["lora_alpha"] = rank, float(delta.scale * rank)
    return args


def _build_from_args(args: Mapping[str, Any], trunk: Encoder, position: int) -> Stitch:
    return build_stitch(
        args["kind"],
        source=_layout(args["source"]),
        target=_layout(args["target"]),
        source_width=int(args["source_width"]),
        target_width=int(args["target_width"]),
        mlp_hidden=args.get("mlp_hidden"),
        source_encoder=trunk if args["kind"] == "lora" else None,
        position=position,
        lora_rank=int(args.get("lora_rank") or 8),
        lora_alpha=args.get("lora_alpha"),
    )


def check_tree_dir(directory: str | Path, *, overwrite: bool = False) -> str:
    """The state of a tree dir before building into it: "fresh" (no tree.json) or "replaced"
    (a tree, and ``overwrite``). A file, or a tree without ``overwrite``, is refused."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise TreeError(
            f"Expected --out to be a directory (or a new path). Got the file {directory} instead."
        )
    if not (directory / TREE_FILE).exists():
        return "fresh"
    if not overwrite:
        raise TreeError(
            f"{directory} already holds a tree ({TREE_FILE}). Choose another directory or "
            "pass overwrite=True (CLI: --overwrite)."
        )
    return "replaced"


def _load_stitch_state(stitch: Stitch, path: Path, where: str) -> None:
    if not path.is_file():
        raise TreeError(f"Missing stitch weights {path} ({where}).")
    try:
        stitch.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise TreeError(
            f"{path} does not fit a {stitch.kind} stitch {stitch.source_width} -> "
            f"{stitch.target_width} ({where}): {str(err).splitlines()[0]}"
        ) from err


def _stitch_files(names: Sequence[str]) -> list[str]:
    """``stitch-<name>.safetensors`` with file-safe names, made unique by an index if needed."""
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", name) for name in names]
    if len(set(safe)) < len(safe):
        safe = [f"{index}-{name}" for index, name in enumerate(safe)]
    return [f"stitch-{name}.safetensors" for name in safe]


def _load_recorded(
    described: Mapping[str, Any],
    weights: Mapping[str, str],
    random_init: bool,
    device: str | torch.device,
    where: str,
) -> Encoder:
    """Load an encoder from a recorded spec and refuse it when the fingerprint differs."""
    name = described["name"]
    encoder = load_encoder(
        name,
        weights=weights.get(name),
        random_init=random_init,
        device=device,
        **described["spec"]["overrides"],
    )
    if encoder.fingerprint != described["fingerprint"]:
        raise TreeError(
            f"Encoder {name} ({where}) loaded with fingerprint {encoder.fingerprint}, but the "
            f"tree was built with fingerprint {described['fingerprint']}: different weights or "
            f"preprocessing. Pass the weights it was built with (--weights {name}=FILE, or "
            "--random-init for random-init encoders)."
        )
    return encoder
