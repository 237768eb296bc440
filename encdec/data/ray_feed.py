"""The Ray Data feed: decoding spread over Ray tasks (any CPU in the cluster), behind ``TileIterator``'s interface.

Pipeline per rank: ``from_items`` of this rank's ``(epoch, sample_id)`` rows, in plan order -> ``map_batches``
(one micro-batch per call: windowed rasterio decode, normalise, augment; numeric columns only) ->
``iter_batches(batch_size=micro_batch)`` with ``preserve_order``.

Exactness (tested in tests/integration/test_ray_data_feed.py): the same as the reader feed. Each rank builds its
own dataset from the exact plan (``plan.FeedPlan``) instead of ``streaming_split`` of one shared dataset, because
``streaming_split`` hands rows to whichever consumer asks first (rows move between ranks, and order depends on
timing), so a resumed run could not know what was consumed. Order is preserved and every returned micro-batch is
checked against the plan (``RayFeedOrderError`` if Ray ever reorders), so each sample is read exactly once per
epoch and resume is exact at any world size. The cost: decode tasks serve one rank each (no work stealing
between ranks); bad-tile details are logged by the Ray tasks, counts and the ceiling are kept on the rank.

On a 2-CPU machine, reserve CPU for these tasks (train workers at CPU 0.5, REFERENCE.md) or the run hangs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from encdec.data.badtiles import EMPTY_REASONS, REASONS, BadTileError, EmptyTileError
from encdec.data.batch import SampleLoader, read_batch, to_torch
from encdec.data.plan import FeedPlan
from encdec.data.position import PlannedIterator

LOG = logging.getLogger("encdec.data")
MIN_SPAN = 512


class RayFeedOrderError(RuntimeError):
    """Ray Data returned rows out of plan order (the exactness guarantee would be broken)."""


def _decode(batch: dict[str, np.ndarray], loader: SampleLoader) -> dict[str, np.ndarray]:
    """``map_batches`` body: rows ``(epoch, sample_id)`` -> decoded arrays plus bookkeeping columns."""
    arrays, bad = read_batch(loader, batch["epoch"], batch["sample_id"])
    for i in np.flatnonzero(bad):
        sid = int(batch["sample_id"][i])
        LOG.warning("skipping bad tile (%s) %s", REASONS[bad[i] - 1], loader.samples[sid].key)
    arrays["requested_id"] = batch["sample_id"].astype(np.int64)
    arrays["bad_reason"] = bad
    return arrays


class RayTileIterator(PlannedIterator):
    """``TileIterator``'s interface, decoding in Ray Data tasks.

    Args:
        plan: Position maths for this rank.
        loader: Per-sample reader (pickled into the Ray tasks).
        cpus_per_task: CPUs reserved per decode task.
        prefetch_batches: Micro-batches Ray prefetches for this rank.
    """

    def __init__(self, plan: FeedPlan, loader: SampleLoader, *, cpus_per_task: float = 0.5,
                 prefetch_batches: int = 2) -> None:
        super().__init__(plan, loader)
        self.cpus_per_task = cpus_per_task
        self.prefetch_batches = prefetch_batches
        self._stream: Iterator[dict[str, np.ndarray]] | None = None
        self._stream_micro = 0  # micro-step the stream will yield next
        self._stream_end = 0

    def _discard(self) -> None:
        self.close()

    def _span(self, start: int) -> tuple[int, int]:
        """Micro-steps one Ray dataset covers: the val pass, or at least an epoch and ``MIN_SPAN`` micro-steps.

        Each new dataset costs a pipeline start (seconds), so spans are long; rows are only two integers.
        """
        if self.plan.micro_steps is not None:
            return start, self.plan.micro_steps
        return start, start + max(MIN_SPAN, self.plan.steps_per_epoch * self.plan.grad_accum)

    def _batch_bytes(self) -> int:
        return sum(a.nbytes for a in self.loader.layout.allocate().values())

    def _open_stream(self, start: int) -> None:
        import ray.data
        from ray.data import ExecutionResources

        begin, end = self._span(start)
        rows: list[dict[str, int]] = []
        for k in range(begin, end):
            epochs, ids = self.plan.micro_positions(k)
            rows.extend({"epoch": int(e), "sample_id": int(s)} for e, s in zip(epochs.tolist(), ids.tolist()))
        # One block per micro-batch: map tasks decode whole micro-batches in parallel, in plan order.
        items = ray.data.from_items(rows, override_num_blocks=end - begin)
        items.context.execution_options.preserve_order = True
        items.context.enable_progress_bars = False
        # Bound the read-ahead like the reader feed does: a few micro-batches of CPU and object store per rank,
        # so decoding never runs far ahead of training (it would take CPU from it on small nodes).
        items.context.execution_options.resource_limits = ExecutionResources(
            cpu=self.cpus_per_task * max(1, self.prefetch_batches),
            object_store_memory=self._batch_bytes() * (self.prefetch_batches + 2),
        )
        decode: Any = _decode
        ds = items.map_batches(decode, batch_size=self.plan.micro_batch, batch_format="numpy",
                            fn_kwargs={"loader": self.loader}, num_cpus=self.cpus_per_task)
        ds.context.execution_options.preserve_order = True
        ds.context.execution_options.resource_limits = items.context.execution_options.resource_limits
        self._stream = iter(ds.iter_batches(batch_size=self.plan.micro_batch, batch_format="numpy",
                                            prefetch_batches=self.prefetch_batches))
        self._stream_micro = begin
        self._stream_end = end

    def __next__(self) -> dict[str, Any]:
        if self._pass_over():
            raise StopIteration
        if self._stream is None or self._stream_micro != self._micro or self._stream_micro >= self._stream_end:
            self.close()
            self._open_stream(self._micro)
        assert self._stream is not None
        batch = next(self._stream)
        _, expected = self.plan.micro_positions(self._micro)
        got = batch.pop("requested_id")
        if not np.array_equal(got, expected):
            raise RayFeedOrderError(f"micro-step {self._micro}: Ray Data returned ids {got.tolist()}, "
                                    f"plan says {expected.tolist()}")
        bad = batch.pop("bad_reason")
        for i in np.flatnonzero(bad):
            sample = self.loader.samples[int(got[i])]
            reason = REASONS[int(bad[i]) - 1]
            kind = EmptyTileError if reason in EMPTY_REASONS else BadTileError
            self.loader.tracker.record(sample.key, kind(sample.images[0], reason, "details in the Ray log"),
                                       self._micro // self.plan.grad_accum)
        self._micro += 1
        self._stream_micro += 1
        # Ray hands out read-only views of its blocks; the trainer gets its own writable copy.
        return to_torch({k: np.array(v, copy=True, order="C") for k, v in batch.items()})

    def close(self) -> None:
        """Stop the running dataset stream."""
        stream, self._stream = self._stream, None
        closer = getattr(stream, "close", None)
        if closer is not None:
            closer()

    def __enter__(self) -> RayTileIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
