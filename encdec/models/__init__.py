"""The model factory: registries' built-in entries, necks, decoders, heads, backbones and PEFT.

Importing this package registers the built-in components and the lazy timm/smp sources; it imports
neither timm's model zoo nor smp (they load on first lookup).
"""

from encdec.models import backbones, decoders, necks  # noqa: F401  (registration side effects)
from encdec.models.factory import TASKS, EncoderDecoderFactory, FactoryError, build_model
from encdec.models.model import AuxiliaryHead, ModelOutput, PixelWiseModel, ScalarOutputModel

__all__ = [
    "TASKS",
    "AuxiliaryHead",
    "EncoderDecoderFactory",
    "FactoryError",
    "ModelOutput",
    "PixelWiseModel",
    "ScalarOutputModel",
    "build_model",
]
