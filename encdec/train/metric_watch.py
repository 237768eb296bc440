"""What early stopping and the plateau schedule share: the best value of one validation metric and the number of
validations since it last improved, fed the all-reduced metrics after each validation, kept in checkpoints.

Each decision says what an improvement is (:meth:`MetricWatch._improves`) and what to do with the count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from encdec.config.early_stop import WatchedMetricConfig

__all__ = ["MetricWatch"]


class MetricWatch:
    """Tracks ``cfg.metric``: :attr:`best` value so far and :attr:`bad` validations since it improved. NaN never
    improves.

    Subclasses set :attr:`section` (the recipe key, for errors) and :attr:`error` (the exception raised when
    validation does not report the metric), and define :meth:`_improves` for a finite value.
    """

    section: ClassVar[str]
    error: ClassVar[type[ValueError]]

    def __init__(self, cfg: WatchedMetricConfig) -> None:
        self.cfg = cfg
        self.best: float | None = None
        self.bad = 0  # validations since the last improvement

    def observe(self, val: Mapping[str, float]) -> bool:
        """Take one validation's (all-reduced) metrics; True when the watched value improved."""
        metric = self.cfg.metric
        if metric not in val:
            raise self.error(f"{self.section}.metric={metric!r} is not reported by validation; it reports "
                             f"{sorted(val)}")
        value = float(val[metric])
        if not math.isnan(value) and self._improves(value):
            self.best, self.bad = value, 0
            return True
        self.bad += 1
        return False

    def _improves(self, value: float) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain numbers: loads with ``weights_only``)."""
        return {"metric": self.cfg.metric, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> bool:
        """Continue counting from a checkpoint's state; False (and the count starts afresh) for a checkpoint
        without it or one that watched another metric."""
        if not state or state.get("metric") != self.cfg.metric:
            return False
        self.best = None if state.get("best") is None else float(state["best"])
        self.bad = int(state.get("bad", 0))
        return True
