"""encdec-launch: fine-tune geospatial foundation models (Prithvi-EO-2.0, any timm backbone) across many machines.

The model side is TerraTorch's EncoderDecoderFactory contract; the launcher side (``encdec.launcher``) runs the
training recipe on Ray Train workers. Names are resolved lazily (PEP 562) so that ``encdec-launch --help`` does
not import torch; ``from encdec import build_model`` imports torch and registers the built-in components, but
never ray, deepspeed, smp, rasterio or timm's model zoo.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from encdec._version import __version__
from encdec.registry import (
    BACKBONE_REGISTRY,
    DECODER_REGISTRY,
    NECK_REGISTRY,
    NECKS_REGISTRY,
    MultiSourceRegistry,
    Registry,
)

if TYPE_CHECKING:
    from encdec.models import (
        AuxiliaryHead,
        EncoderDecoderFactory,
        ModelOutput,
        PixelWiseModel,
        ScalarOutputModel,
        build_model,
    )
    from encdec.predict import api as _predict_api

    predict = _predict_api.predict

_FROM_MODELS = {
    "AuxiliaryHead",
    "EncoderDecoderFactory",
    "ModelOutput",
    "PixelWiseModel",
    "ScalarOutputModel",
    "build_model",
}

__all__ = [
    "BACKBONE_REGISTRY",
    "DECODER_REGISTRY",
    "NECKS_REGISTRY",
    "NECK_REGISTRY",
    "AuxiliaryHead",
    "EncoderDecoderFactory",
    "ModelOutput",
    "MultiSourceRegistry",
    "PixelWiseModel",
    "Registry",
    "ScalarOutputModel",
    "__version__",
    "build_model",
    "predict",
]


def __getattr__(name: str) -> Any:
    if name == "predict":  # the package, callable as the API function (see encdec/predict/__init__.py)
        return importlib.import_module("encdec.predict")
    if name in _FROM_MODELS:
        return getattr(importlib.import_module("encdec.models"), name)
    raise AttributeError(f"module 'encdec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
