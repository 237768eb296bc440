"""``schedule: plateau``: the decision to lower the learning rate, as a small pure object the loop asks after each
validation (torch's ``ReduceLROnPlateau``, step for step, but counted in validations).

Every rank holds one and feeds it the same all-reduced validation metrics, so every rank decides the same; the
loop checks that with the one small all-reduce it already makes for early stopping. The LR itself stays a pure
function of the optimizer step and the number of reductions so far (``encdec.train.optim.lr_at``), so the state
to checkpoint is a handful of numbers: best value, bad validations, cooldown left and reductions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from encdec.config.plateau import PlateauConfig
from encdec.train.metric_watch import MetricWatch

__all__ = ["PlateauError", "PlateauScheduler"]

# torch's ReduceLROnPlateau(eps=1e-8): a reduction smaller than this (the LR is at min_lr) is not made
_EPS = 1e-8


class PlateauError(ValueError):
    """``optim.plateau.metric`` is not reported by validation."""


class PlateauScheduler(MetricWatch):
    """Counts validations without improvement of ``cfg.metric``; :meth:`update` says when the LR drops.

    Mirrors ``torch.optim.lr_scheduler.ReduceLROnPlateau.step``: a value is an improvement when it beats the best
    by ``threshold`` (relative or absolute); after more than ``patience`` bad validations the LR is multiplied by
    ``factor`` (not below ``min_lr``), the count restarts and ``cooldown`` validations are not counted. The first
    finite value is always an improvement; NaN never is one.

    Args:
        cfg: the ``optim.plateau`` section.
        lr: the peak learning rate (``optim.lr``).
        min_lr: the floor (``optim.min_lr``).
    """

    section = "optim.plateau"
    error = PlateauError
    cfg: PlateauConfig

    def __init__(self, cfg: PlateauConfig, *, lr: float, min_lr: float = 0.0) -> None:
        super().__init__(cfg)  # bad: torch's num_bad_epochs
        self.base_lr = float(lr)
        self.min_lr = float(min_lr)
        self.cooldown_left = 0
        self.reductions = 0

    @property
    def lr(self) -> float:
        """The learning rate after the reductions so far (the plateau schedule's peak, before any warmup)."""
        return max(self.min_lr, self.base_lr * self.cfg.factor ** self.reductions)

    def update(self, val: Mapping[str, float]) -> bool:
        """Take one validation's (all-reduced) metrics; True when the learning rate dropped now."""
        self.observe(val)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad = 0  # bad validations in cooldown are ignored
        if self.bad <= self.cfg.patience:
            return False
        old = self.lr
        self.cooldown_left, self.bad = self.cfg.cooldown, 0
        if old - max(old * self.cfg.factor, self.min_lr) <= _EPS:
            return False  # already at the floor
        self.reductions += 1
        return True

    def _improves(self, value: float) -> bool:
        t = self.cfg.threshold
        best = self.best if self.best is not None else (math.inf if self.cfg.mode == "min" else -math.inf)
        if self.cfg.mode == "min":
            return value < (best * (1.0 - t) if self.cfg.threshold_mode == "rel" else best - t)
        return value > (best * (1.0 + t) if self.cfg.threshold_mode == "rel" else best + t)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain numbers: loads with ``weights_only``)."""
        return {**super().state_dict(), "cooldown_left": self.cooldown_left, "reductions": self.reductions}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> bool:
        """Continue from a checkpoint's state. The reductions made so far always carry over (the LR does not jump
        back up); a checkpoint that watched another metric restarts the count and the best value."""
        if not state:
            return False
        self.reductions = int(state.get("reductions", 0))
        if not super().load_state_dict(state):
            return False
        self.cooldown_left = int(state.get("cooldown_left", 0))
        return True
