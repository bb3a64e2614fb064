"""``model.onnx`` of a hybrid: preprocessed images ``(B, 3, H, W)`` -> ``final`` ``(B, T, D)``
and ``pooled`` ``(B, D_out)``, batch dimension dynamic, written by the TorchScript exporter
(``dynamo=False``: it needs no onnxscript) and checked in onnxruntime (CPU) against torch on
the images given; the largest absolute difference is returned and recorded by the export.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.encoders import Encoder
from stitchtrain.hybrid.errors import HybridError

__all__ = ["ONNX_OPSET", "check_onnx", "write_onnx"]

ONNX_OPSET = 17


class _Forward(nn.Module):
    """The encoder's whole forward as a plain module (what the exporter traces)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(images)


def write_onnx(encoder: Encoder, path: Path, images: torch.Tensor) -> None:
    """Export ``encoder``'s forward to ``path``, traced on ``images`` (CPU, float32)."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as err:
        raise HybridError(
            "Expected the onnx and onnxruntime packages for --format onnx "
            "(pip install 'featcache-stitchtrain[onnx]'). Got ImportError: " + str(err)
        ) from err
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks: constants here
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            _Forward(encoder).eval(),
            (images,),
            str(path),
            input_names=["image"],
            output_names=["final", "pooled"],
            dynamic_axes={"image": {0: "batch"}, "final": {0: "batch"}, "pooled": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


def check_onnx(encoder: Encoder, path: Path, images: torch.Tensor) -> float:
    """Max |onnxruntime - torch| over ``final`` and ``pooled`` of ``images`` (CPU)."""
    try:
        import onnxruntime
    except ImportError as err:
        raise HybridError(
            "Expected onnxruntime to check model.onnx (pip install onnxruntime). Got "
            f"ImportError: {err}"
        ) from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    final, pooled = session.run(["final", "pooled"], {"image": images.numpy()})
    with torch.no_grad():
        want_final, want_pooled = encoder(images)
    return float(
        max(
            np.abs(final - want_final.numpy()).max(),
            np.abs(pooled - want_pooled.numpy()).max(),
        )
    )
