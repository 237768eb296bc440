"""LoRA for the planner without the ``peft`` library: same parameters, same saved activations, no import cost.

Importing ``peft`` imports ``transformers``, several seconds on a small machine - most of what a plan of the
300M recipe would cost. For plain LoRA (the recipes' case) the planner instead splits qkv with
``encdec.models.peft.replace_qkv`` (no peft import), checks ``target_modules`` with peft's matching rule, freezes
the encoder and wraps each target ``Linear`` in :class:`StandinLoRA`, which computes ``base(x) + B(A(x)) * s`` like
peft's LoRA layer: the parameter counts (``lora_A``: r x in, ``lora_B``: out x r) and the tensors autograd saves
are the same (tests/unit/test_plan.py compares with a real peft model). Other PEFT methods and LoRA options that
change the layer (DoRA, per-layer ranks, ...) go through peft itself.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from encdec.config import PeftSection
from encdec.models.peft.config import PeftConfigError
from encdec.models.peft.qkv import replace_qkv

__all__ = ["StandinLoRA", "apply_standin_lora", "supports_standin"]

# LoRA options that leave the layer as base + B(A(x)) * scaling
_PLAIN_KEYS = {"target_modules", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "init_lora_weights",
               "fan_in_fan_out", "exclude_modules"}


def supports_standin(peft: PeftSection | None) -> bool:
    """Whether the planner can stand in for peft on this config (plain LoRA)."""
    if peft is None or peft.method.upper() != "LORA":
        return False
    kwargs = peft.peft_config_kwargs
    return set(kwargs) <= _PLAIN_KEYS and kwargs.get("bias", "none") == "none"


class StandinLoRA(nn.Module):
    """``base(x) + lora_B(lora_A(x)) * scaling`` with a frozen base (the shape of peft's LoRA Linear)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        self.scaling = alpha / (r**0.5 if rslora else r)

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _matches(names: list[str], targets: str | list[str]) -> list[str]:
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    # peft's rule for a list: the whole name, or a suffix of it that starts at a dot
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def apply_standin_lora(encoder: nn.Module, peft: PeftSection) -> int:
    """Split qkv, freeze ``encoder`` and wrap its LoRA targets in place. Returns the adapter parameter count.

    Raises:
        ValueError: (``PeftConfigError``) no target matched, a target is not a Linear, or a bad ``replace_qkv``.
    """
    kwargs = dict(peft.peft_config_kwargs)
    if peft.replace_qkv:
        replace_qkv(encoder, peft.replace_qkv)
    targets = kwargs.get("target_modules")
    if not targets:
        raise PeftConfigError("peft_config.peft_config_kwargs.target_modules is empty: name the Linear layers to adapt")
    names = [n for n, _ in encoder.named_modules() if n]
    exclude = kwargs.get("exclude_modules") or []
    matched = [n for n in _matches(names, targets) if n not in _matches(names, exclude)]
    if not matched:
        linears = sorted({n.split(".", 1)[-1] for n, m in encoder.named_modules() if isinstance(m, nn.Linear)})[:8]
        raise PeftConfigError(f"peft_config.peft_config_kwargs.target_modules {targets} match no module of "
                              f"{type(encoder).__name__}; Linear modules there: {linears}. After replace_qkv the fused "
                              "qkv is split into qkv.q_linear, qkv.k_linear, qkv.v_linear")
    r = int(kwargs.get("r", 8))
    alpha = float(kwargs.get("lora_alpha", 8))
    encoder.requires_grad_(False)
    added = 0
    for name in matched:
        layer = encoder.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise PeftConfigError(f"LoRA target {name} is a {type(layer).__name__}; the planner's LoRA covers Linear "
                                  "layers (peft supports others: they are planned through peft)")
        parent, _, attr = name.rpartition(".")
        with torch.device(layer.weight.device):
            wrapped = StandinLoRA(layer, r, alpha, bool(kwargs.get("use_rslora", False)))
        setattr(encoder.get_submodule(parent) if parent else encoder, attr, wrapped)
        added += r * (layer.in_features + layer.out_features)
    return added
