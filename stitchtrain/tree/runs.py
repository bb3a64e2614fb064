"""The run dirs a tree is built from, checked before any encoder loads (``resolve_runs``), and
the trunk encoder they name (``load_trunk``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featcache.encoders import Encoder, load_encoder
from featcache.errors import FeatcacheError
from featcache.store import FeatureStore
from stitchtrain.model.stitches import build_stitch
from stitchtrain.train.rundir import read_json_object
from stitchtrain.tree.errors import TreeError
from stitchtrain.tree.saved import _layout, _load_stitch_state

__all__ = ["ResolvedRun", "load_trunk", "resolve_runs"]


@dataclass(frozen=True)
class ResolvedRun:
    """One branch's run dir with its config and opened stores (``resolve_runs``)."""

    name: str | None  # the branch name given (None: the target encoder's name)
    run_dir: Path
    config: dict[str, Any]
    source: FeatureStore
    target: FeatureStore


def resolve_runs(
    position: int,
    runs: Sequence[str | Path | tuple[str, str | Path]],
    *,
    allow_geometry_mismatch: bool = False,
) -> list[ResolvedRun]:
    """Check every run dir of a tree before any encoder is loaded: finished (config.json and
    stitch.safetensors), stitched at ``position``, its source and target stores found and
    holding the same images (``pairing.check_same_images``: ids and row digests), their
    geometries paired (``pairing.check_geometry``, unless allowed here or by the run), and one
    source encoder (fingerprint) across all runs: the trunk's. Raises ``TreeError`` /
    ``PairingError`` naming the run dir."""
    from stitchtrain.data.pairing import check_geometry, check_same_images

    resolved = []
    for item in runs:
        name, run_dir = item if isinstance(item, tuple) else (None, item)
        run_dir = Path(run_dir)
        config = _run_config(run_dir)
        if config["position"] != position:
            raise TreeError(
                f"Run dir {run_dir} stitches at position {config['position']}, but the tree "
                f"shares trunk blocks 1..{position} (position {position}). Use runs trained "
                f"at position {position}, or build the tree with --position "
                f"{config['position']}."
            )
        source, target = (_open_run_store(config, role, run_dir) for role in ("source", "target"))
        check_same_images(source, target)
        allowed = allow_geometry_mismatch or config.get("allow_geometry_mismatch", False)
        check_geometry(source, target, allow_mismatch=allowed)
        first = resolved[0] if resolved else None
        if first is not None:
            want, got = first.source.attrs["encoder"], source.attrs["encoder"]
            if want["fingerprint"] != got["fingerprint"]:
                raise TreeError(
                    f"Run dirs {first.run_dir} and {run_dir} were trained on source features of "
                    f"different encoders ({want['name']} fingerprint {want['fingerprint']}, "
                    f"{got['name']} fingerprint {got['fingerprint']}): one tree has one trunk. "
                    "Use runs whose source store was extracted with the trunk."
                )
        if config["stitch"] != "lora":  # LoRA stitches need the trunk's block: checked later
            stitch = build_stitch(
                config["stitch"],
                source=_layout(source.attrs["encoder"]["layout"]),
                target=_layout(target.attrs["encoder"]["layout"]),
                source_width=source.attrs["encoder"]["width"],
                target_width=target.attrs["encoder"]["width"],
                mlp_hidden=config.get("mlp_hidden"),
                position=position,
            )
            _load_stitch_state(stitch, run_dir / "stitch.safetensors", f"run dir {run_dir}")
        resolved.append(ResolvedRun(name, run_dir, config, source, target))
    return resolved


def _open_run_store(config: dict[str, Any], role: str, run_dir: Path) -> FeatureStore:
    try:
        return FeatureStore.open(config[role])
    except FeatcacheError as err:
        raise TreeError(
            f"Run dir {run_dir}: its {role} store {config[role]} cannot be opened "
            f"({' '.join(str(err).split())}). Restore the store, or fit the run again."
        ) from err


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise TreeError(f"{run_dir} is not a stitchtrain run dir (no config.json).")
    config = read_json_object(
        path, "a run's config (a JSON object)", "Is it a stitchtrain run dir?"
    )
    if not (run_dir / "stitch.safetensors").is_file():
        raise TreeError(
            f"Run dir {run_dir} has no stitch.safetensors: the run has not finished. "
            "Finish it with the same stitchtrain fit command."
        )
    return config


def load_trunk(
    name: str,
    runs: Sequence[str | Path | tuple[str, str | Path]],
    *,
    weights: str | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> Encoder:
    """Load the trunk encoder ``name`` for ``VFMStitchTree.from_runs``.

    Architecture overrides recorded in the first run's source store are reused when that store
    was written by an encoder of the same name (a ``timm:...`` name extracted with
    ``img_size=...``); the fingerprint check in ``from_runs`` decides whether it fits.
    """
    overrides: dict[str, Any] = {}
    if runs:
        first = runs[0]
        run_dir = Path(first[1] if isinstance(first, tuple) else first)
        recorded = FeatureStore.open(_run_config(run_dir)["source"]).attrs["encoder"]
        if recorded["name"] == name:
            overrides = dict(recorded["spec"]["overrides"])
    return load_encoder(name, weights=weights, random_init=random_init, device=device, **overrides)
