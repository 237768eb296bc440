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
from typing import Any

import numpy as np

from encdec.data.batch import SampleLoader, to_torch
from encdec.data.plan import FeedPlan
from encdec.data.position import PlannedIterator

LOG = logging.getLogger("encdec.data")


class TileIterator(PlannedIterator):
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
        super().__init__(plan, loader)
        self.threads = threads
        self.prefetch_batches = prefetch_batches
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: collections.deque[tuple[int, dict[str, np.ndarray], list[cf.Future[None]]]] = (
            collections.deque()
        )

    # -- interface (position and state: ``PlannedIterator``) --------------------------------------------------

    def __next__(self) -> dict[str, Any]:
        if self._pass_over():
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

    def _discard(self) -> None:
        self._drop_pending()

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
            self._pool.submit(self.loader.load, arrays, i, int(e), int(sid), micro // self.plan.grad_accum)
            for i, (e, sid) in enumerate(zip(epochs.tolist(), ids.tolist()))
        ]
        self._pending.append((micro, arrays, futures))

    def _fill(self) -> None:
        total = self.plan.micro_steps
        nxt = self._pending[-1][0] + 1 if self._pending else self._micro
        while len(self._pending) < self.prefetch_batches + 1 and (total is None or nxt < total):
            self._submit(nxt)
            nxt += 1
