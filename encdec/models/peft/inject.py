"""Injecting the adapters into the backbone in place (``peft.inject_adapter_in_model``), after the qkv split."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from encdec.models.peft.config import PeftConfigError, TrainableSetError, build_peft_config, parse_peft_config
from encdec.models.peft.qkv import _base_path, replace_qkv
from encdec.models.peft.trainable import parameter_report, tuner_layers

__all__ = ["get_peft_backbone"]

LOG = logging.getLogger("encdec.peft")

def _plain_keys_to_base_layer(module: Any, state_dict: dict[str, Any], prefix: str, *rest: Any) -> None:
    """Load pre-hook of an adapted layer: a plain layer's ``<prefix>weight`` goes to ``<prefix>base_layer.weight``.

    Pretrained checkpoints and exports hold plain keys (``mlp.fc2.weight``). A module-level function, so the model
    still pickles.
    """
    base = module.get_base_layer()
    path = _base_path(module)
    for name, _ in [*base.named_parameters(recurse=False), *base.named_buffers(recurse=False)]:
        key, dest = prefix + name, prefix + path + name
        if key in state_dict:
            if dest in state_dict:
                rest[-1].append(f"both the plain key {key} and the adapted layer's key {dest} are given; keep one")
                continue
            state_dict[dest] = state_dict.pop(key)


def get_peft_backbone(peft_config: Mapping[str, Any], encoder: nn.Module) -> nn.Module:
    """Split fused qkv (``replace_qkv``), inject the adapters and freeze the base backbone, in place.

    Args:
        peft_config: ``{"method", "replace_qkv", "peft_config_kwargs"}`` (see the module docstring).
        encoder: the backbone; it keeps its class, attributes (``out_channels``, ``patch_size``, ``blocks``) and
            forward signature.

    Returns:
        The same ``encoder`` object, adapted: only adapter parameters require grad in it.

    Raises:
        PeftConfigError: unknown method, bad options, targets or ``replace_qkv`` that match nothing.
        TrainableSetError: the adapters ended up with no trainable parameter (e.g. ``inference_mode: true``).
    """
    cfg = parse_peft_config(peft_config)
    from peft import inject_adapter_in_model

    if any(True for _ in tuner_layers(encoder)):
        raise PeftConfigError(f"{type(encoder).__name__} already carries peft adapters; apply peft_config to a plain backbone once")
    if cfg.replace_qkv is not None:
        replace_qkv(encoder, cfg.replace_qkv)
    peft_cfg = build_peft_config(cfg.method, cfg.peft_config_kwargs, encoder)
    try:
        inject_adapter_in_model(peft_cfg, encoder)
    except (TypeError, ValueError) as e:
        raise PeftConfigError(f"peft could not apply {cfg.method} to {type(encoder).__name__}: {e}") from e
    for _, layer in tuner_layers(encoder):
        layer.register_load_state_dict_pre_hook(_plain_keys_to_base_layer)
    report = parameter_report(encoder)
    if report["adapters"].trainable == 0:
        raise TrainableSetError(
            f"{cfg.method} adapters were injected ({report['adapters'].total} parameters) but none is trainable; "
            "remove inference_mode from peft_config_kwargs"
        )
    LOG.info("PEFT %s on %s: adapters %d trainable", cfg.method, type(encoder).__name__, report["adapters"].trainable)
    return encoder


