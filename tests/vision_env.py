"""Importing torchvision (and timm, which imports it) where its compiled ops cannot load.

PyPI's ``torchvision`` wheel for a given torch is a CUDA build: its ``torchvision/_C.so`` links
``libtorch_cuda``. On the CPU torch wheel that library is missing, the extension fails to load
(torchvision warns), and ``import torchvision`` then raises in
``torchvision/_meta_registrations.py``: two ``torch.library.register_fake`` calls, for
``torchvision::nms`` and ``torchvision::qnms``, are not guarded by ``_has_ops()`` like the others,
and their schemas were never defined. :func:`import_torchvision` defines those two schemas (the
signatures of torchvision's own C++ registration) and imports again. The classification models
are pure Python and work; the detection ops (``nms``, ``roi_align``, ``deform_conv2d``, ...) have
no kernel and raise torchvision's own error if called. Nothing changes where the ops load.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list[torch.library.Library] = []  # kept alive: a dropped Library undoes its definitions


def import_torchvision() -> ModuleType | None:
    """``torchvision``, imported (with the two schemas defined if its ops failed to load), or
    ``None`` if it is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to load image Python extension")
        warnings.filterwarnings("ignore", message=".*torchvision.*ops.*", category=UserWarning)
        try:
            import torchvision
        except RuntimeError as error:
            if "torchvision::" not in str(error) or _LIBRARIES:
                raise
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]  # the half-imported package
            library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                library.define(schema)
            _LIBRARIES.append(library)
            import torchvision
    return torchvision


def ops_missing() -> bool:
    """Did torchvision's compiled ops fail to load (so that :func:`import_torchvision` patched it)?"""
    return bool(_LIBRARIES)
