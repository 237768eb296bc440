"""Tiled inference on scenes larger than memory: ``predict`` (and ``evaluate``) with TerraTorch's tiled semantics.

Names load lazily so that ``import encdec.predict`` (and ``encdec-launch --help``) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_NAMES = {
    "predict": "encdec.predict.api",
    "plan_predict": "encdec.predict.api",
    "PredictResult": "encdec.predict.api",
    "TiledParams": "encdec.predict.windows",
    "plan_windows": "encdec.predict.windows",
    "discover_scenes": "encdec.predict.scenes",
    "SceneError": "encdec.predict.scenes",
    "OutputSpec": "encdec.predict.outputs",
    "evaluate_scenes": "encdec.predict.evaluate",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'encdec.predict' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


class _CallablePackage(types.ModuleType):
    """``encdec.predict(...)`` is the API function, and ``encdec.predict`` also the package: importing a submodule
    binds the package as ``encdec.predict``, so the package itself forwards calls to :func:`api.predict`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("encdec.predict.api").predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
