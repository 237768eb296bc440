"""The default feed: an exact, prefetching, per-rank reader.

Each rank reads its slice of each global batch (``plan.FeedPlan``) with a thread pool: decode, normalise and
augment run off the training thread (GDAL and numpy release the GIL), each sample written straight into its
slot of a preallocated batch. At most ``prefetch_batches`` micro-batches are in flight, so memory is bounded by
``(prefetch_batches + 1) x micro-batch``. No Ray and no process group are needed.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from encdec.data.batch import SampleLoader, to_torch
from encdec.data.plan import FeedPlan

LOG = logging.getLogger("encdec.data")


class TileIterator:
    """Iterates this rank's micro-batches (a global step is ``grad_accum`` consecutive ones).

    Train: endless over epochs (a fresh seeded permutation per epoch). Val/test: one full pass per ``iter()``.
    Batches are dicts of tensors: ``image`` float32 [b,C,H,W] (or [b,C,T,H,W]), ``mask`` int64 [b,H,W] (-1 =
    ignore) or float32 (NaN = ignore) or ``label`` [b], ``sample_id`` int64 [b] (-1 = padding or a skipped bad
    tile, whose target is all-ignore), optional ``temporal_coords`` [b,T,2] and ``location_coords`` [b,2].

    Args:
        plan: Position maths for this rank.
        loader: Reads one sample into a slot.
        threads: Reader threads.
        prefetch_batches: Micro-batches read ahead.
    """

    def __init__(self, plan: FeedPlan, loader: SampleLoader, *, threads: int = 4, prefetch_batches: int = 2) -> None:
        self.plan = plan
        self.loader = loader
        self.threads = threads
        self.prefetch_batches = prefetch_batches
        self._micro = 0  # micro-steps consumed (yielded) so far
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: collections.deque[tuple[int, dict[str, np.ndarray], list[cf.Future[None]]]] = (
            collections.deque()
        )
        self._pass_done = False

    # -- interface -------------------------------------------------------------------------------------------

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
        micro = self.plan.micro_step_of(state)
        self._drop_pending()
        self.loader.seed = self.plan.seed
        self._micro = micro
        self._pass_done = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.plan.train and (self._pass_done or self._micro):
            # Each ``for`` loop over val/test is a full pass, even after an interrupted one.
            self._drop_pending()
            self._micro = 0
            self._pass_done = False
        return self

    def __next__(self) -> dict[str, Any]:
        total = self.plan.micro_steps
        if total is not None and self._micro >= total:
            self._pass_done = True
            raise StopIteration
        self._fill()
        micro, arrays, futures = self._pending.popleft()
        try:
            for f in futures:
                f.result()
        except BaseException:
            self._drop_pending()
            raise
        self._micro = micro + 1
        self._fill()
        return to_torch(arrays)

    def close(self) -> None:
        """Stop the reader threads and drop prefetched batches."""
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> TileIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- prefetching -----------------------------------------------------------------------------------------

    def _drop_pending(self) -> None:
        while self._pending:
            for f in self._pending.popleft()[2]:
                f.cancel()

    def _submit(self, micro: int) -> None:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="encdec-data")
        epochs, ids = self.plan.micro_positions(micro)
        arrays = self.loader.layout.allocate()
        futures = [
            self._pool.submit(self.loader.load, arrays, i, int(e), int(sid))
            for i, (e, sid) in enumerate(zip(epochs.tolist(), ids.tolist()))
        ]
        self._pending.append((micro, arrays, futures))

    def _fill(self) -> None:
        total = self.plan.micro_steps
        nxt = self._pending[-1][0] + 1 if self._pending else self._micro
        while len(self._pending) < self.prefetch_batches + 1 and (total is None or nxt < total):
            self._submit(nxt)
            nxt += 1
