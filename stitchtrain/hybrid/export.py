"""``stitchtrain export RUN_DIR --out DIR``: a hybrid as a self-contained folder.

Written (``exported`` reads it back):

    config.json          format, format_version, label, fingerprint, stage, position, the
                         stitch (kind, options, layouts, widths), each parent (name,
                         overrides, fingerprint, its store description: weight tag in its
                         spec; the weights file it loaded with, with its SHA-256, or random
                         init; the shipped file), preprocessing and geometry, the layer map,
                         the run it came from, ``files`` (SHA-256 of every other file) and
                         ``config_sha256`` (of the rest of config.json)
    stitch.safetensors   the stage's stitch file, byte for byte (no pickle)
    source.safetensors,  the parents' state dicts, only with ``with_weights``
    target.safetensors
    model.onnx           with ``onnx``: images -> (final, pooled), checked in onnxruntime

Everything is checked, and the folder is written beside ``out`` under a temporary name,
loaded back (its fingerprint must be the hybrid's) and only then renamed to ``out``: a
failure leaves nothing. ``out`` must be new or an empty directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from featcache.encoders import load_encoder
from stitchtrain.hybrid.encoder import HybridEncoder, layer_map
from stitchtrain.hybrid.errors import HybridError
from stitchtrain.hybrid.exported import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    config_digest,
    file_digest,
)
from stitchtrain.hybrid.onnx_model import ONNX_OPSET, check_onnx, write_onnx

__all__ = ["EXPORT_FORMATS", "export_hybrid"]

EXPORT_FORMATS = ("safetensors", "onnx")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise HybridError(f"Expected --out to be a new or empty directory. Got the file {out}.")
    if out.is_dir() and any(out.iterdir()):
        raise HybridError(
            f"Expected --out to be a new or empty directory. Got {out}, which holds files."
        )


def _parent_record(hybrid: HybridEncoder, role: str, shipped: bool) -> dict[str, Any]:
    encoder = getattr(hybrid, role)
    recorded = hybrid.parts.parents[role]
    weights = recorded.get("weights")
    if isinstance(weights, str):  # a run dir's: the path; an export's: already a record
        weights = {"file": weights, "sha256": file_digest(Path(weights))}
    if shipped and encoder.family == "stitched":
        raise HybridError(
            f"--with-weights ships plain encoders' weights; the {role} of {hybrid.name} is the "
            f"hybrid {encoder.name}. Export it without --with-weights."
        )
    return {
        "name": encoder.name,
        "overrides": dict(recorded.get("overrides", {})),
        "fingerprint": encoder.fingerprint,
        "description": recorded.get("description") or encoder.describe(),
        "weights": weights,
        "random_init": bool(recorded.get("random_init")),
        "shipped": f"{role}.safetensors" if shipped else None,
    }


def _stitch_file(hybrid: HybridEncoder) -> Path:
    parts = hybrid.parts
    name = "stitch.safetensors" if parts.origin == "export" else f"stitch-{parts.stage}.safetensors"
    return parts.path / name


def _config(hybrid: HybridEncoder, with_weights: bool) -> dict[str, Any]:
    parts, stitch = hybrid.parts, hybrid.stitch
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "label": parts.label,
        "fingerprint": hybrid.fingerprint,
        "stage": parts.stage,
        "position": parts.position,
        "stitch": {
            "kind": stitch.kind,
            "mlp_hidden": parts.run.get("mlp_hidden"),
            "lora_rank": parts.run.get("lora_rank", 8),
            "source_layout": stitch.source.to_dict(),
            "target_layout": stitch.target.to_dict(),
            "source_width": stitch.source_width,
            "target_width": stitch.target_width,
            "parameters": sum(p.numel() for p in stitch.parameters()),
        },
        "source": _parent_record(hybrid, "source", with_weights),
        "target": _parent_record(hybrid, "target", with_weights),
        "preprocessing": hybrid.preprocessing.to_dict(),
        "geometry": hybrid.geometry.to_dict(),
        "depth": hybrid.depth,
        "layers": layer_map(hybrid.source_layers, hybrid.position, hybrid.depth, stitch),
        "run": parts.run,
    }


def _write(hybrid: HybridEncoder, folder: Path, with_weights: bool, onnx: bool) -> dict:
    config = _config(hybrid, with_weights)
    shutil.copyfile(_stitch_file(hybrid), folder / "stitch.safetensors")
    if with_weights:
        for role in ("source", "target"):
            state = getattr(hybrid, role).module.state_dict()
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            # not save_file: it writes mode 0600; these bytes follow the umask
            (folder / f"{role}.safetensors").write_bytes(save(tensors))
    if onnx:
        cpu = hybrid.to("cpu")
        images = torch.randn(2, 3, *cpu.image_size, generator=torch.Generator().manual_seed(0))
        write_onnx(cpu, folder / "model.onnx", images)
        difference = check_onnx(cpu, folder / "model.onnx", images)
        config["onnx"] = {
            "opset": ONNX_OPSET,
            "inputs": {"image": ["batch", 3, *cpu.image_size]},
            "outputs": ["final", "pooled"],
            "max_abs_diff": difference,
        }
    files = sorted(p.name for p in folder.iterdir())
    config["files"] = {name: file_digest(folder / name) for name in files}
    config["config_sha256"] = config_digest(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return config


def export_hybrid(
    run_dir: str | Path,
    out: str | Path,
    *,
    stage: str | None = None,
    with_weights: bool = False,
    fmt: str = "safetensors",
) -> dict[str, Any]:
    """Write the export folder of ``stitched:RUN_DIR[#stage]`` to ``out`` (module docstring);
    return its config (``onnx.max_abs_diff`` with ``fmt="onnx"``)."""
    if fmt not in EXPORT_FORMATS:
        raise HybridError(f"Expected --format in {EXPORT_FORMATS}. Got {fmt!r} instead.")
    out = Path(out)
    _check_out(out)
    name = f"stitched:{run_dir}" + (f"#{stage}" if stage else "")
    hybrid = load_encoder(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        config = _write(hybrid, folder, with_weights, fmt == "onnx")
        again = load_encoder(f"stitched:{folder}")
        if again.fingerprint != hybrid.fingerprint:
            raise HybridError(
                f"Expected the export of {hybrid.name} to load with fingerprint "
                f"{hybrid.fingerprint}. Got {again.fingerprint} instead."
            )
        if out.is_dir():
            out.rmdir()
        folder.rename(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return config
