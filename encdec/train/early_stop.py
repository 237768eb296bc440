"""``train.early_stop``: the decision, as a small pure object the loop asks after each validation.

Every rank holds one and feeds it the same all-reduced validation metrics, so every rank decides the same;
the loop still all-reduces the decision (one float per validation) so no rank can ever leave the loop alone.
Its state (best value, validations without improvement) goes into each checkpoint's extra state, so a resumed
run keeps counting where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from encdec.config.early_stop import EarlyStopConfig
from encdec.train.metric_watch import MetricWatch

__all__ = ["EarlyStopError", "EarlyStopper"]


class EarlyStopError(ValueError):
    """``train.early_stop`` is invalid or names a metric validation does not report."""


class EarlyStopper(MetricWatch):
    """Counts validations without improvement of ``cfg.metric``; :meth:`update` says when to stop.

    An improvement is a value better than the best so far by more than ``min_delta`` (lower for ``mode: min``,
    higher for ``max``); the first finite value always is one. NaN never improves.
    """

    section = "train.early_stop"
    error = EarlyStopError
    cfg: EarlyStopConfig

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> EarlyStopper | None:
        """From the recipe's ``train.early_stop`` (None when absent).

        Raises:
            EarlyStopError: an unknown key or a value out of range, naming it.
        """
        if not section:
            return None
        try:
            return cls(EarlyStopConfig.model_validate(dict(section)))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise EarlyStopError(f"train.early_stop.{where}: {first['msg']} (got {first.get('input')!r}); "
                                 f"allowed keys: {sorted(EarlyStopConfig.model_fields)}") from err

    def update(self, val: Mapping[str, float]) -> bool:
        """Take one validation's (all-reduced) metrics; True when the run should stop now."""
        self.observe(val)
        return self.bad >= self.cfg.patience

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.cfg.mode == "min":
            return value < self.best - self.cfg.min_delta
        return value > self.best + self.cfg.min_delta
