"""Make ``import torchvision`` work beside a CPU build of torch.

pip resolves ``torchvision`` to a CUDA wheel on PyPI even when torch is the local CPU build.
That wheel's C extension does not load, so the ``torchvision::nms`` / ``torchvision::qnms`` op
schemas are never defined and ``torchvision/_meta_registrations.py`` fails with
``RuntimeError: operator torchvision::nms does not exist``; ``import timm`` and
``import open_clip`` fail with it. Defining the two schemas before a second import attempt makes
the Python package import; nothing here calls those ops. Where torchvision imports cleanly
(any matched install, every GPU machine) this module does nothing.
"""

from __future__ import annotations

import sys

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it would undefine the ops


def ensure_torchvision() -> None:
    """Import torchvision, defining the missing detection-op schemas first if that is needed."""
    global _LIBRARY
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "transforms"):
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


ensure_torchvision()
