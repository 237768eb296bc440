"""Which sample each rank reads at each micro-step: the exact, world-size-independent position maths.

The train split is one endless stream: epoch ``e`` contributes the seeded permutation ``perm(seed, e)`` of all
``N`` sample ids, and epochs follow each other without gaps, so every sample is used exactly once per epoch and
no sample is dropped or repeated at an epoch boundary (a global batch may straddle two epochs).

Micro-step ``k`` (a global step is ``grad_accum`` micro-steps) covers stream positions
``[k * B/A, (k+1) * B/A)`` (``B`` global batch, ``A`` grad_accum); rank ``r`` of ``W`` reads the ``r``-th of the
``W`` equal parts. The position saved is the global stream position ``(epoch, samples_consumed, seed)``, which
means the same thing at any world size, so a resumed run repeats and skips nothing.

The val split is one pass in id order; each rank gets the same number of micro-batches (trailing slots are
padding, sample id -1), because sharded models need every rank in every forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from encdec.data.config import DataConfigError

PAD = -1


@dataclass
class FeedPlan:
    """Position maths for one rank.

    Args:
        num_samples: Samples in the split (``N``).
        global_batch_size: Samples per optimizer step over all ranks (``B``).
        world_size: Ranks (``W``).
        rank: This rank.
        grad_accum: Micro-steps per optimizer step (``A``).
        seed: Seed of the per-epoch permutations.
        train: Endless shuffled stream (train) or one ordered pass (val/test).
    """

    num_samples: int
    global_batch_size: int
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1
    seed: int = 0
    train: bool = True
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        b, w, a = self.global_batch_size, self.world_size, self.grad_accum
        if w < 1 or not 0 <= self.rank < w:
            raise DataConfigError(f"rank={self.rank} world_size={w}: need world_size >= 1 and 0 <= rank < world_size")
        if a < 1:
            raise DataConfigError(f"grad_accum={a}: must be >= 1 (optim.grad_accum)")
        if b % (w * a):
            raise DataConfigError(
                f"data.global_batch_size={b} is not divisible by world_size x grad_accum = {w} x {a} = {w * a}. "
                f"Fix: make global_batch_size a multiple of {w * a} (e.g. {max(1, b // (w * a)) * w * a})."
            )
        if self.num_samples < 1:
            raise DataConfigError("the split has no samples")

    @property
    def micro_batch(self) -> int:
        """Samples per micro-batch on each rank."""
        return self.global_batch_size // (self.world_size * self.grad_accum)

    @property
    def chunk(self) -> int:
        """Global samples per micro-step (all ranks together)."""
        return self.micro_batch * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last may straddle into the next epoch on train)."""
        return math.ceil(self.num_samples / self.global_batch_size)

    @property
    def micro_steps(self) -> int | None:
        """Micro-batches per rank in one val pass (``None`` for the endless train stream)."""
        return None if self.train else math.ceil(self.num_samples / self.chunk)

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample ids in epoch order (identity on val)."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.train:
                perm = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x5EED]).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def micro_positions(self, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(epochs, sample_ids)`` this rank reads at ``micro_step``; padding slots have id ``PAD``."""
        start = micro_step * self.chunk + self.rank * self.micro_batch
        pos = np.arange(start, start + self.micro_batch, dtype=np.int64)
        if not self.train:
            ids = np.where(pos < self.num_samples, pos, PAD)
            return np.zeros_like(pos), ids
        epochs = pos // self.num_samples
        ids = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            ids[sel] = self.permutation(int(e))[pos[sel] % self.num_samples]
        return epochs, ids

    def state_at(self, micro_step: int) -> dict[str, int]:
        """The saved position after ``micro_step`` micro-steps have been consumed."""
        pos = micro_step * self.chunk
        if not self.train:
            return {"epoch": 0, "samples_consumed": min(pos, self.num_samples), "seed": self.seed}
        return {"epoch": pos // self.num_samples, "samples_consumed": pos % self.num_samples, "seed": self.seed}

    def micro_step_of(self, state: dict[str, int]) -> int:
        """Invert ``state_at``: the micro-step to continue from (adopting the saved seed)."""
        try:
            epoch, consumed, seed = int(state["epoch"]), int(state["samples_consumed"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataConfigError(
                f"data state {state!r} is not a data position: need epoch, samples_consumed and seed"
            ) from e
        if epoch < 0 or not 0 <= consumed <= self.num_samples:
            raise DataConfigError(
                f"data state {state!r} does not fit this split of {self.num_samples} samples. Fix: resume with "
                f"the same tile set the checkpoint was made with."
            )
        if seed != self.seed:
            self.seed = seed
            self._perms.clear()
        pos = epoch * self.num_samples + consumed if self.train else consumed
        if pos % self.chunk and not (not self.train and pos == self.num_samples):
            raise DataConfigError(
                f"data state {state!r} is not on a micro-batch boundary of {self.chunk} samples "
                f"(global_batch_size {self.global_batch_size} / grad_accum {self.grad_accum}). Fix: resume with the "
                f"grad_accum the run was saved with, or from a checkpoint taken at an optimizer step."
            )
        return math.ceil(pos / self.chunk)
