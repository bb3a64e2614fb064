"""Reading an export folder (``stitchtrain export``) back as a hybrid's parts.

The folder holds ``config.json`` (format ``stitchtrain-hybrid``, ``EXPORT_VERSION``) and
``stitch.safetensors``, with ``source.safetensors`` / ``target.safetensors`` when exported
``--with-weights`` and ``model.onnx`` with ``--format onnx``. ``config.json`` records the
SHA-256 of every other file (``files``) and of itself without that key
(``config_sha256``, ``config_digest``); loading checks all of them before any parent loads.
Each parent loads as ``load_encoder`` loads any model: the shipped weights file, else the
weights file the run used (found at its recorded path with its recorded SHA-256), else random
init when the run was random-init (tiny presets always are), else the hub; its fingerprint
must be the recorded one. Every failure is a one-line ``HybridError``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from featcache.encoders import Encoder, load_encoder
from featcache.errors import FeatcacheError
from featcache.jsontext import parse_json
from stitchtrain.hybrid.errors import HybridError
from stitchtrain.hybrid.parts import HybridParts, build_loaded_stitch, read_json

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "config_digest",
    "file_digest",
    "is_export",
    "parts_from_export",
]

EXPORT_FORMAT = "stitchtrain-hybrid"
EXPORT_VERSION = 1


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of ``config`` without ``config_sha256``, as canonical JSON (sorted keys)."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_export(path: Path) -> bool:
    """Whether folder ``path`` is an export folder (its config.json names the format)."""
    try:
        config = parse_json((path / "config.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == EXPORT_FORMAT


def _check_files(path: Path, config: dict[str, Any]) -> None:
    if config.get("config_sha256") != config_digest(config):
        raise HybridError(
            f"Expected {path / 'config.json'} to have the SHA-256 recorded at export "
            f"({config.get('config_sha256')}). Got {config_digest(config)} instead: the file "
            "was edited since. Export the run again."
        )
    if config.get("format_version") != EXPORT_VERSION:
        raise HybridError(
            f"Expected export format version {EXPORT_VERSION} in {path / 'config.json'}. Got "
            f"{config.get('format_version')!r} instead: export the run again."
        )
    for name, recorded in config["files"].items():
        file = path / name
        if not file.is_file():
            raise HybridError(f"Export folder {path} lacks {name}, which its config.json lists.")
        digest = file_digest(file)
        if digest != recorded:
            raise HybridError(
                f"Expected {file} to have the SHA-256 recorded at export ({recorded}). Got "
                f"{digest} instead: the file changed since the export."
            )


def _load_parent(path: Path, role: str, record: dict[str, Any], device) -> Encoder:
    name, overrides = record["name"], dict(record.get("overrides", {}))
    shipped = record.get("shipped")
    weights = None
    if shipped:
        weights = path / shipped
    elif record.get("weights"):
        weights = Path(record["weights"]["file"])
        if not weights.is_file() or file_digest(weights) != record["weights"]["sha256"]:
            raise HybridError(
                f"Export {path}: its {role} parent {name} needs the weights file {weights} "
                f"(SHA-256 {record['weights']['sha256']}), which is not there or differs. "
                "Put the file back, or export with --with-weights."
            )
    try:
        encoder = load_encoder(
            name,
            weights=weights,
            random_init=bool(record.get("random_init")) and weights is None,
            device=device,
            **overrides,
        )
    except FeatcacheError as err:
        raise HybridError(
            f"Export {path}: its {role} parent {name} could not be loaded "
            f"({' '.join(str(err).split())})."
        ) from err
    if encoder.fingerprint != record["fingerprint"]:
        raise HybridError(
            f"Export {path}: its {role} parent {name} loaded with fingerprint "
            f"{encoder.fingerprint}, but the export recorded {record['fingerprint']}: other "
            "weights or preprocessing. Supply the parent's own weights, or export with "
            "--with-weights."
        )
    return encoder


def parts_from_export(path: Path, stage: str | None, device: torch.device) -> HybridParts:
    """The parts of the hybrid in export folder ``path`` (module docstring: the checks)."""
    path = Path(path).resolve()
    config = read_json(path / "config.json", "export config")
    _check_files(path, config)
    if stage is not None and stage != config["stage"]:
        raise HybridError(
            f"Expected stage {config['stage']} for export {path} (an export holds one stage). "
            f"Got {stage!r} instead."
        )
    source = _load_parent(path, "source", config["source"], device)
    target = _load_parent(path, "target", config["target"], device)
    stitch_file = path / "stitch.safetensors"
    stitch = build_loaded_stitch(
        config["stitch"]["kind"],
        source,
        target,
        int(config["position"]),
        stitch_file.read_bytes(),
        str(stitch_file),
        mlp_hidden=config["stitch"].get("mlp_hidden"),
        lora_rank=int(config["stitch"].get("lora_rank", 8)),
    )
    return HybridParts(
        path=path,
        origin="export",
        source=source,
        target=target,
        stitch=stitch,
        stitch_sha256=config["files"]["stitch.safetensors"],
        position=int(config["position"]),
        stage=config["stage"],
        label=config["label"],
        parents={role: config[role] for role in ("source", "target")},
        run=dict(config.get("run", {})),
    )
