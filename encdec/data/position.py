"""What both feeds share: the plan-driven position, its state dict, and pass/epoch bookkeeping.

A feed (``feed.TileIterator``, ``ray_feed.RayTileIterator``) counts micro-steps yielded on this rank; the plan
turns that count into the global position ``{"epoch", "samples_consumed", "seed"}`` and back, so a run resumes
exactly at any world size. Subclasses say how to drop batches already in flight (``_discard``) and read the next.
"""

from __future__ import annotations

from typing import Any

from encdec.data.batch import SampleLoader
from encdec.data.plan import FeedPlan


class PlannedIterator:
    """Base of the feeds: micro-step position, ``state_dict``/``load_state_dict``, one pass per ``iter()`` on val.

    Args:
        plan: Position maths for this rank.
        loader: Reads one sample into a slot.
    """

    def __init__(self, plan: FeedPlan, loader: SampleLoader) -> None:
        self.plan = plan
        self.loader = loader
        self._micro = 0  # micro-steps consumed (yielded) so far
        self._pass_done = False

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch (global, all ranks)."""
        return self.plan.num_samples

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (global)."""
        return self.plan.steps_per_epoch

    @property
    def micro_batch_size(self) -> int:
        """Samples per micro-batch on this rank."""
        return self.plan.micro_batch

    @property
    def bad_tiles(self) -> dict[str, int]:
        """Bad tiles met on this rank, per reason, plus ``total``."""
        return self.loader.tracker.summary()

    def __len__(self) -> int:
        """Micro-batches per rank in one pass (val/test) or in one epoch (train, rounded up)."""
        if self.plan.micro_steps is not None:
            return self.plan.micro_steps
        return self.plan.steps_per_epoch * self.plan.grad_accum

    def state_dict(self) -> dict[str, int]:
        """Global position ``{"epoch", "samples_consumed", "seed"}`` of the batches yielded so far."""
        return self.plan.state_at(self._micro)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (any world size with the same global batch size)."""
        micro = self.plan.micro_step_of(state)  # validates before anything in flight is dropped
        self._discard()
        self.loader.seed = self.plan.seed
        self._micro = micro
        self._pass_done = False

    def __iter__(self) -> PlannedIterator:
        if not self.plan.train and (self._pass_done or self._micro):
            # Each ``for`` loop over val/test is a full pass, even after an interrupted one.
            self._discard()
            self._micro = 0
            self._pass_done = False
        return self

    def _pass_over(self) -> bool:
        """True (and the pass marked done) when a val/test pass has yielded all its micro-batches."""
        total = self.plan.micro_steps
        if total is not None and self._micro >= total:
            self._pass_done = True
            return True
        return False

    def _discard(self) -> None:
        """Drop batches read ahead for the old position."""
        raise NotImplementedError
