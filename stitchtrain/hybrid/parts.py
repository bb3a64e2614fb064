"""What a hybrid is made of (``HybridParts``), read from a finished fit run dir.

A run dir becomes a hybrid when: it is a fit run dir (config.json with a position; a
``stitchtrain probe`` dir has no stitch), finished (metrics.json), not a self-stitch (its two
stores' encoders differ by fingerprint), the stage exists (default: the run's final stage,
the one its test metrics score and stitch.safetensors holds; ``#STAGE`` picks another), its
``stitch-<stage>.safetensors`` has the SHA-256 the run recorded (metrics.json's
``stitch_sha256``, else the stage record's), both stores open, both parents load with the
stores' fingerprints (``load_run_encoder``: the run's weights files or random init) and the
stitch's tensors have the shapes its kind needs between them. Anything else is a one-line
``HybridError``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

from featcache.encoders import Encoder
from featcache.errors import FeatcacheError
from featcache.jsontext import parse_json
from featcache.store import FeatureStore
from stitchtrain.data.names import encoder_label
from stitchtrain.hybrid.errors import HybridError
from stitchtrain.model.stitches import Stitch, build_stitch
from stitchtrain.train.encoders import load_run_encoder

__all__ = ["HybridParts", "build_loaded_stitch", "hybrid_label", "parts_from_run", "read_json"]


@dataclass
class HybridParts:
    """A hybrid's parents, stitch and provenance.

    Attributes:
        path: the run dir or export folder (absolute).
        origin: "run" or "export".
        source, target: the frozen parents, fingerprint-checked.
        stitch: the trained stitch, its weights loaded.
        stitch_sha256: SHA-256 of the stitch's safetensors file.
        position, stage: where it stitches and which stage of its run it is.
        label: readable name, ``source[:n]→target``.
        parents: per role, how the parent loads (name, overrides, fingerprint, weights file
            and its SHA-256, random_init): what an export records.
        run: the run's objective, stitch options and stores (what an export records of it).
    """

    path: Path
    origin: str
    source: Encoder
    target: Encoder
    stitch: Stitch
    stitch_sha256: str
    position: int
    stage: str
    label: str
    parents: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a ``HybridError`` naming ``what`` otherwise."""
    try:
        data = parse_json(path.read_bytes())
    except (OSError, ValueError) as err:
        raise HybridError(
            f"Expected {what} {path} to be readable JSON. Got {err} instead."
        ) from err
    if not isinstance(data, dict):
        raise HybridError(f"Expected {what} {path} to hold a JSON object. Got {data!r} instead.")
    return data


def hybrid_label(source: dict[str, Any], target: dict[str, Any], position: int) -> str:
    """``source[:n]→target`` from two encoder descriptions (a hybrid parent by its label)."""
    return f"{encoder_label(source)}[:{position}]→{encoder_label(target)}"


def build_loaded_stitch(
    kind: str,
    source: Encoder,
    target: Encoder,
    position: int,
    data: bytes,
    where: str,
    *,
    mlp_hidden: int | None = None,
    lora_rank: int = 8,
) -> Stitch:
    """The ``kind`` stitch from ``source`` to ``target`` at ``position`` with the tensors of
    safetensors bytes ``data`` (``where`` names the file in errors), frozen, on the source's
    device."""
    try:
        state = load(data)
    except Exception as err:  # safetensors raises its own error types for a malformed file
        raise HybridError(f"Expected {where} to be a safetensors file. Got {err} instead.") from err
    try:
        stitch = build_stitch(
            kind,
            source=source.layout,
            target=target.layout,
            source_width=source.width,
            target_width=target.width,
            mlp_hidden=mlp_hidden,
            source_encoder=source if kind == "lora" else None,
            position=position,
            lora_rank=lora_rank,
        )
    except ValueError as err:
        raise HybridError(f"{where}: {err}") from err
    want = {k: tuple(v.shape) for k, v in stitch.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        raise HybridError(
            f"Expected {where} to hold the {kind} stitch of {source.name} (width {source.width}) "
            f"-> {target.name} (width {target.width}) at position {position}: tensors {want}. "
            f"Got {got} instead."
        )
    stitch.load_state_dict(state)
    return stitch.to(source.device).eval().requires_grad_(False)


def _open_store(url: str, role: str, run_dir: Path) -> FeatureStore:
    try:
        return FeatureStore.open(url)
    except FeatcacheError as err:
        raise HybridError(
            f"Run dir {run_dir}: its {role} store {url} cannot be opened "
            f"({' '.join(str(err).split())}); the hybrid's {role} is loaded as that store "
            "records it. Restore the store, or export the hybrid where it exists."
        ) from err


def _recorded_digest(run_dir: Path, metrics: dict[str, Any], stage: str) -> str:
    digest = (metrics.get("stitch_sha256") or {}).get(stage)
    record = run_dir / f"stage-{stage}.json"
    if digest is None and record.is_file():
        digest = read_json(record, "stage record").get("stitch_sha256")
    if not isinstance(digest, str):
        raise HybridError(
            f"Run dir {run_dir} records no SHA-256 of stitch-{stage}.safetensors (neither "
            f"metrics.json's stitch_sha256 nor stage-{stage}.json): its stitch cannot be "
            "checked. Fit the run again with this version."
        )
    return digest


def parts_from_run(run_dir: str | Path, stage: str | None, device: torch.device) -> HybridParts:
    """The parts of the hybrid of fit run dir ``run_dir`` (module docstring: the checks)."""
    run_dir = Path(run_dir).resolve()
    config = read_json(run_dir / "config.json", "run config")
    if "position" not in config:
        what = "a linear-probe run dir (stitchtrain probe)" if "store" in config else "no fit run"
        raise HybridError(
            f"Expected a fit run dir with a trained stitch. Got {run_dir}, {what}: it has no "
            "stitch to make a hybrid of."
        )
    if not (run_dir / "metrics.json").is_file():
        raise HybridError(
            f"Run dir {run_dir} is unfinished (no metrics.json). Finish it with the same "
            "stitchtrain fit command first."
        )
    metrics = read_json(run_dir / "metrics.json", "run metrics")
    stages = str(config["objective"]).split("+")
    stage = stage or metrics.get("final_stage") or stages[-1]
    if stage not in stages:
        raise HybridError(
            f"Expected a stage of run dir {run_dir} ({', '.join(stages)}). Got {stage!r} instead."
        )
    stitch_path = run_dir / f"stitch-{stage}.safetensors"
    if not stitch_path.is_file():
        raise HybridError(f"Run dir {run_dir} has no {stitch_path.name}: stage {stage} is missing.")
    data = stitch_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    recorded = _recorded_digest(run_dir, metrics, stage)
    if digest != recorded:
        raise HybridError(
            f"Expected {stitch_path} to have the SHA-256 the run recorded ({recorded}). Got "
            f"{digest} instead: the file changed since the fit."
        )
    stores = {role: _open_store(config[role], role, run_dir) for role in ("source", "target")}
    described = {role: store.attrs["encoder"] for role, store in stores.items()}
    if described["source"]["fingerprint"] == described["target"]["fingerprint"]:
        raise HybridError(
            f"Run dir {run_dir} is a self-stitch of {described['source']['name']}: its hybrid "
            "would be that encoder again. Expected a stitch between two different encoders."
        )
    random_init = bool(config.get("random_init", False))
    encoders, parents = {}, {}
    for role, store in stores.items():
        weights = config.get(f"{role}_weights")
        encoders[role] = load_run_encoder(store, weights, random_init, device)
        parents[role] = {
            "name": described[role]["name"],
            "overrides": dict(described[role]["spec"].get("overrides", {})),
            "fingerprint": described[role]["fingerprint"],
            "description": described[role],
            "weights": str(Path(weights).resolve()) if weights else None,
            "random_init": random_init,
        }
    position = int(config["position"])
    stitch = build_loaded_stitch(
        config["stitch"],
        encoders["source"],
        encoders["target"],
        position,
        data,
        str(stitch_path),
        mlp_hidden=config.get("mlp_hidden"),
        lora_rank=int(config.get("lora_rank", 8)),
    )
    run = {
        "objective": config["objective"],
        "stitch": config["stitch"],
        "mlp_hidden": config.get("mlp_hidden"),
        "lora_rank": int(config.get("lora_rank", 8)),
        "stores": {role: config[role] for role in ("source", "target")},
        "run_dir": str(run_dir),
    }
    return HybridParts(
        path=run_dir,
        origin="run",
        source=encoders["source"],
        target=encoders["target"],
        stitch=stitch,
        stitch_sha256=digest,
        position=position,
        stage=stage,
        label=hybrid_label(described["source"], described["target"], position),
        parents=parents,
        run=run,
    )
