"""Optimizer over trainable parameters only, and the learning-rate schedule (linear warmup + cosine).

Optimizer section (``optim:`` in the recipe): ``name`` (adamw | sgd), ``lr``, ``weight_decay``, ``schedule``
(cosine | constant), ``warmup_steps``, ``min_lr`` (floor of the cosine, default 0), ``betas`` / ``eps`` / ``fused``
(adamw; fused by default: one kernel per parameter instead of ~10 passes, also on CPU and on FSDP2's DTensors),
``momentum`` / ``nesterov`` (sgd), ``grad_clip`` and ``grad_accum`` (read by the loop, not here).

The schedule is a pure function of the optimizer step, applied by writing ``group["lr"]`` before each step.
So resuming needs only the step (no scheduler object to save), and it works unchanged on optimizers that are
not ``torch.optim.Optimizer`` subclasses (DeepSpeed's ZeRO wrappers expose ``param_groups`` too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimConfigError",
    "build_optimizer",
    "lr_at",
    "no_decay",
    "param_groups",
    "set_lr",
]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
# keys this module reads; the loop reads grad_clip and grad_accum
_KEYS = {"name", "lr", "weight_decay", "schedule", "warmup_steps", "min_lr", "betas", "eps", "momentum", "nesterov",
         "fused", "grad_clip", "grad_accum"}
# parameters that are not weights of a linear map: decaying them towards 0 only hurts (tokens, embeddings, scales)
_NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "temporal_embed_scale", "location_embed_scale", "scale")


class OptimConfigError(ValueError):
    """The ``optim:`` section is invalid."""


def check_optim_cfg(cfg: Mapping[str, Any]) -> None:
    """Validate the keys and values this module and the loop use.

    Raises:
        OptimConfigError: naming the key, the value and what is allowed.
    """
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise OptimConfigError(f"optim section has unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise OptimConfigError(f"optim.name {name!r} is not supported; use one of {', '.join(OPTIMIZERS)}")
    schedule = cfg.get("schedule", "cosine")
    if schedule not in SCHEDULES:
        raise OptimConfigError(f"optim.schedule {schedule!r} is not supported; use one of {', '.join(SCHEDULES)}")
    for key in ("lr", "weight_decay", "warmup_steps", "min_lr"):
        if key in cfg and (not isinstance(cfg[key], (int, float)) or cfg[key] < 0):
            raise OptimConfigError(f"optim.{key} must be a number >= 0, got {cfg[key]!r}")
    accum = cfg.get("grad_accum", 1)
    if not isinstance(accum, int) or accum < 1:
        raise OptimConfigError(f"optim.grad_accum must be an integer >= 1, got {accum!r}")


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter is exempt from weight decay: biases, norm weights (any 0/1-d tensor), tokens,
    position embeddings and learnable scales."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf in _NO_DECAY_NAMES or name.endswith(_NO_DECAY_NAMES)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Two groups over the trainable parameters: with weight decay and without (empty groups dropped).

    Args:
        named_params: ``model.named_parameters()`` (after sharding: DTensors keep their ``ndim``).
        weight_decay: decay of the first group.
    """
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters; call it after sharding (FSDP2 swaps parameters).

    Raises:
        OptimConfigError: invalid section, or a model with no trainable parameter (e.g. a backbone frozen after
            PEFT, which freezes the adapters too).
    """
    check_optim_cfg(optim_cfg)
    groups = param_groups(model.named_parameters(), optim_cfg.get("weight_decay", 0.0))
    if not groups:
        raise OptimConfigError(
            "the model has no trainable parameter, so there is nothing to optimise; if the backbone was frozen "
            "after PEFT its adapters were frozen too: freeze before PEFT or do not freeze the backbone"
        )
    lr = float(optim_cfg.get("lr", 1e-4))
    if optim_cfg.get("name", "adamw") == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=float(optim_cfg.get("momentum", 0.9)), nesterov=bool(optim_cfg.get("nesterov", False))
        )
    betas = tuple(float(b) for b in optim_cfg.get("betas", (0.9, 0.999)))
    params = [p for g in groups for p in g["params"]]
    fused = bool(optim_cfg.get("fused", True)) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=float(optim_cfg.get("eps", 1e-8)),  # type: ignore[arg-type]
                             fused=fused or None)


def lr_at(step: int, optim_cfg: Mapping[str, Any], max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from ``lr/warmup`` to ``lr`` over
    ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``max_steps`` (or constant)."""
    lr = float(optim_cfg.get("lr", 1e-4))
    warmup = int(optim_cfg.get("warmup_steps", 0))
    if step < warmup:
        return lr * (step + 1) / warmup
    if optim_cfg.get("schedule", "cosine") == "constant":
        return lr
    min_lr = float(optim_cfg.get("min_lr", 0.0))
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Any, lr: float) -> None:
    """Write ``lr`` into every param group (scaled by the group's optional ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
