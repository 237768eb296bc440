"""Optimizer over trainable parameters only, and the learning-rate schedule (linear warmup + cosine/plateau).

Optimizer section (``optim:`` in the recipe, ``encdec.config.OptimSection``): ``name`` (adamw | sgd), ``lr``, ``weight_decay``, ``schedule``
(cosine | constant | plateau, with ``plateau``: ``encdec.train.plateau``), ``warmup_steps``, ``min_lr`` (floor of the
cosine and plateau schedules, default 0), ``betas`` / ``eps`` / ``fused``
(adamw; fused by default: one kernel per parameter instead of ~10 passes, also on CPU and on FSDP2's DTensors),
``momentum`` / ``nesterov`` (sgd), ``grad_clip`` and ``grad_accum`` (read by the loop, not here).

The schedule is a pure function of the optimizer step (and, for plateau, of the reductions so far), applied by
writing ``group["lr"]`` before each step. So resuming needs only the step and the plateau state (no torch scheduler
object to save), and it works unchanged on optimizers that are not ``torch.optim.Optimizer`` subclasses
(DeepSpeed's ZeRO wrappers expose ``param_groups`` too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from encdec.config import OptimSection

__all__ = [
    "OptimConfigError",
    "build_optimizer",
    "lr_at",
    "no_decay",
    "param_groups",
    "set_lr",
]

# parameters that are not weights of a linear map: decaying them towards 0 only hurts (tokens, embeddings, scales)
_NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "temporal_embed_scale", "location_embed_scale", "scale")


class OptimConfigError(ValueError):
    """The optimizer cannot be built (nothing to optimise)."""


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


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters; call it after sharding (FSDP2 swaps parameters).

    Raises:
        OptimConfigError: a model with no trainable parameter (e.g. a backbone frozen after PEFT, which freezes
            the adapters too).
    """
    groups = param_groups(model.named_parameters(), optim.weight_decay)
    if not groups:
        raise OptimConfigError(
            "the model has no trainable parameter, so there is nothing to optimise; if the backbone was frozen "
            "after PEFT its adapters were frozen too: freeze before PEFT or do not freeze the backbone"
        )
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    params = [p for g in groups for p in g["params"]]
    fused = optim.fused and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,  # type: ignore[arg-type]
                             fused=fused or None)


def lr_at(step: int, optim: OptimSection, max_steps: int, *, plateau_lr: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from ``lr/warmup`` to ``lr`` over
    ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``max_steps``, constant, or (schedule plateau)
    ``plateau_lr``: the LR after the plateau reductions so far (``PlateauScheduler.lr``; default ``lr``), which
    the warmup then ramps to."""
    lr, warmup, min_lr = optim.lr, optim.warmup_steps, optim.min_lr
    if optim.schedule == "plateau" and plateau_lr is not None:
        lr = plateau_lr
    if step < warmup:
        return lr * (step + 1) / warmup
    if optim.schedule in ("constant", "plateau"):
        return lr
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Any, lr: float) -> None:
    """Write ``lr`` into every param group (scaled by the group's optional ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
