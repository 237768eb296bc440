"""Which parameters are adapters (found structurally, never by name), which train, and how many there are: the
one freezer (:func:`set_trainable`), its check and the one parameter counter (:func:`parameter_report`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

from torch import Tensor, nn

from encdec.models.peft.config import ADAPTER_KEY_MARKERS, TrainableSetError
from encdec.models.peft.standin import StandinLoRA

__all__ = ["PARTS", "PartCount", "adapter_parameter_names", "adapter_state_keys", "check_trainable",
           "freeze_backbone", "is_adapter_key", "parameter_report", "set_trainable",
           "tuner_layers"]

def tuner_layers(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(name, layer)`` for every peft tuner layer (an adapted Linear) inside ``module``."""
    # A model can hold peft layers only if peft was imported (to build or unpickle them): do not import it here,
    # which would cost seconds for models without PEFT.
    utils = sys.modules.get("peft.tuners.tuners_utils")
    if utils is None:
        return
    for name, m in module.named_modules():
        if isinstance(m, utils.BaseTunerLayer):
            yield name, m



# -- which parameters are adapters, which train ------------------------------------------------------------------


def _adapter_entries(module: nn.Module, state: bool) -> set[str]:
    names: set[str] = set()
    for lname, layer in tuner_layers(module):
        pre = f"{lname}." if lname else ""
        entries = layer.state_dict(keep_vars=True) if state else dict(layer.named_parameters())
        names.update(pre + k for k in entries if not k.startswith("base_layer."))
    for lname, layer in module.named_modules():  # the planner's stand-in LoRA (``standin.StandinLoRA``)
        if isinstance(layer, StandinLoRA):
            pre = f"{lname}." if lname else ""
            entries = layer.state_dict(keep_vars=True) if state else dict(layer.named_parameters())
            names.update(pre + k for k in entries if not k.startswith("base_layer."))
    return names


def adapter_parameter_names(module: nn.Module) -> set[str]:
    """Names (as in ``module.named_parameters()``) of the adapter parameters: inside a tuner layer, outside its
    base layer. Found structurally, not by matching names."""
    return _adapter_entries(module, state=False)


def adapter_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the adapters (parameters and persistent buffers) inside ``module``."""
    return _adapter_entries(module, state=True)


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key names an adapter entry (it contains one of ``ADAPTER_KEY_MARKERS``)."""
    return any(marker in key for marker in ADAPTER_KEY_MARKERS)


def _encoder_of(model: nn.Module) -> nn.Module:
    enc = getattr(model, "encoder", None)
    return enc if isinstance(enc, nn.Module) else model


def freeze_backbone(model: nn.Module) -> int:
    """Freeze the backbone's base weights and leave its adapters trainable (the safe "freeze encoder").

    TerraTorch's ``freeze_encoder`` after PEFT sets ``requires_grad=False`` on every encoder parameter, adapters
    included, and trains nothing in the backbone. Here adapters are told apart structurally.

    Args:
        model: a factory model (its ``encoder`` is frozen) or an encoder.

    Returns:
        The number of backbone parameters left trainable (the adapters').
    """
    enc = _encoder_of(model)
    adapters = adapter_parameter_names(enc)
    for name, p in enc.named_parameters():
        p.requires_grad_(name in adapters)
    return sum(_numel(p) for n, p in enc.named_parameters() if n in adapters)


def set_trainable(model: nn.Module, *, freeze_backbone: bool = False, freeze_decoder: bool = False) -> PartCount:
    """The run's trainable set (``train.freeze_backbone`` / ``freeze_decoder``), checked; the one freezer.

    Freezing the backbone freezes its base weights and never its adapters (:func:`freeze_backbone`); freezing
    the decoder freezes it whole.

    Returns:
        ``(trainable, total)`` parameter counts of the model.

    Raises:
        TrainableSetError: nothing is left to train, or the backbone's adapters are all frozen.
    """
    if freeze_backbone and isinstance(getattr(model, "encoder", None), nn.Module):
        _freeze_backbone_base(model)
    if freeze_decoder and isinstance(getattr(model, "decoder", None), nn.Module):
        model.decoder.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainableSetError(
            "no parameter is trainable after train.freeze_backbone/freeze_decoder; unfreeze something "
            "(or give model.peft_config so adapters are trained)"
        )
    check_trainable(model)
    return parameter_report(model)["total"]


def check_trainable(model: nn.Module) -> None:
    """Raise if the trainable set is broken; the engine calls it right before building the optimizer.

    Raises:
        TrainableSetError: the backbone has adapters and all are frozen (the freeze trap: something froze the
            whole encoder after PEFT), or nothing in the model is trainable.
    """
    enc = _encoder_of(model)
    adapters = adapter_parameter_names(enc)
    frozen = [n for n, p in enc.named_parameters() if n in adapters and not p.requires_grad]
    if adapters and len(frozen) == len(adapters):
        raise TrainableSetError(
            f"all {len(adapters)} adapter tensors of the backbone are frozen (e.g. {frozen[0]}), so PEFT trains nothing "
            "in it: something set requires_grad=False on the whole encoder after PEFT was applied. Use "
            "encdec.models.peft.freeze_backbone(model), which freezes only the base weights"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainableSetError(f"{type(model).__name__} has no trainable parameter; nothing would be optimised")



# -- parameter report ---------------------------------------------------------------------------------------------


class PartCount(NamedTuple):
    """Trainable and total parameter counts of one part of a model."""

    trainable: int
    total: int


PARTS = ("backbone-base", "adapters", "neck", "decoder", "head", "aux_heads")


def _numel(p: Tensor) -> int:
    # DeepSpeed ZeRO-3 leaves 0-element placeholders and keeps the real size in ds_numel
    return int(getattr(p, "ds_numel", p.numel()))


def parameter_report(model: nn.Module) -> dict[str, PartCount]:
    """Trainable / total parameters per part (``PARTS``) plus ``total``; works on meta and sharded models.

    ``backbone-base`` is the encoder minus its adapters. Given a bare encoder, the other parts are zero.
    """
    counts = {part: [0, 0] for part in PARTS}

    def add(part: str, p: Tensor) -> None:
        counts[part][1] += _numel(p)
        counts[part][0] += _numel(p) if p.requires_grad else 0

    enc = _encoder_of(model)
    adapters = adapter_parameter_names(enc)
    for name, p in enc.named_parameters():
        add("adapters" if name in adapters else "backbone-base", p)
    if enc is not model:
        for part in PARTS[2:]:
            sub = getattr(model, part, None)
            for p in sub.parameters() if isinstance(sub, nn.Module) else ():
                add(part, p)
    report = {part: PartCount(*c) for part, c in counts.items()}
    report["total"] = PartCount(sum(c.trainable for c in report.values()), sum(c.total for c in report.values()))
    return report


_freeze_backbone_base = freeze_backbone  # set_trainable's keyword of the same name hides it
