"""Re-initialising adapters after ``to_empty`` (the meta path): one rule per tuner type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from encdec.models.peft.trainable import _encoder_of, tuner_layers

__all__ = ["reset_adapters"]

def _layer_adapters(layer: Any) -> list[str]:
    names: dict[str, None] = {}
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            names.update(dict.fromkeys(container.keys()))
    return list(names)


def _reset_lora(layer: Any, name: str, cfg: Any) -> None:
    init = getattr(cfg, "init_lora_weights", True)
    if init is False:  # peft leaves both at nn.Linear's default init
        layer.lora_A[name].reset_parameters()
        layer.lora_B[name].reset_parameters()
    else:
        layer.reset_lora_parameters(name, init)
    if name in getattr(layer, "lora_magnitude_vector", {}):  # DoRA: the norm of the (loaded) adapted weight
        delta = layer.lora_B[name].weight @ layer.lora_A[name].weight
        norm = torch.linalg.norm(layer.get_base_layer().weight + layer.scaling[name] * delta, dim=1)
        layer.lora_magnitude_vector[name].weight.copy_(norm)


def _reset_lycoris(layer: Any, name: str, cfg: Any) -> None:  # LoHa, LoKr
    if getattr(cfg, "init_weights", True) is False:
        layer.reset_adapter_parameters_random(name)
    else:
        layer.reset_adapter_parameters(name)


def _reset_ia3(layer: Any, name: str, cfg: Any) -> None:
    if getattr(cfg, "init_ia3_weights", True):
        layer.reset_ia3_parameters(name)
    else:
        layer.ia3_l[name].normal_()


def _reset_oft(layer: Any, name: str, cfg: Any) -> None:
    rot = layer.oft_R[name]
    rows, cols = torch.triu_indices(rot.block_size, rot.block_size, 1, device=rot.rows.device)
    rot.rows.copy_(rows)
    rot.cols.copy_(cols)
    layer.reset_oft_parameters(name, getattr(cfg, "init_weights", True))


@torch.no_grad()
def reset_adapters(module: nn.Module) -> int:
    """Give every adapter the value peft gives it at injection again, in place.

    Needed on the meta path: after ``to_empty`` adapter tensors hold garbage, and a generic ``reset_parameters``
    would give LoRA's ``B`` a random value instead of zeros. Call it after the base weights are loaded (DoRA's
    magnitude is the norm of the loaded weight) and before loading a trainable checkpoint to resume. Also
    recomputes OFT's (non-persistent) index buffers.

    Returns:
        The number of (layer, adapter) pairs reset.
    """
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.oft.layer import OFTLayer

    rules = ((LoraLayer, _reset_lora), (LoHaLayer, _reset_lycoris), (LoKrLayer, _reset_lycoris),
             (IA3Layer, _reset_ia3), (OFTLayer, _reset_oft))
    configs = getattr(_encoder_of(module), "peft_config", None) or getattr(module, "peft_config", None)
    count = 0
    for lname, layer in tuner_layers(module):
        rule = next((fn for cls, fn in rules if isinstance(layer, cls)), None)
        if rule is None:
            raise TypeError(f"reset_adapters: no rule for {type(layer).__name__} at {lname}")
        for name in _layer_adapters(layer):
            rule(layer, name, configs.get(name) if isinstance(configs, Mapping) else None)
            count += 1
    return count


