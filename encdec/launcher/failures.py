"""Which worker failures Ray Train may retry: never a deterministic data error.

``FailureConfig(max_failures=N)`` restarts the worker group after any worker error. A data error that will recur
(``encdec.data.badtiles.recurs``: a data setting that cannot work, more bad tiles than ``data.max_bad_fraction``)
would fail N more times, each after a worker-group restart and a model build. Ray Train runs user callbacks on its
controller after each poll of the workers, and an exception raised there is a controller error, which its failure
policy does not retry: ``StopOnDataError`` raises one naming the rank and the data error.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from encdec.data.badtiles import recurs

__all__ = ["DataErrorNotRetried", "StopOnDataError"]


class DataErrorNotRetried(RuntimeError):
    """A worker met a data error that every retry would meet again; the run fails without retrying."""


class StopOnDataError(UserCallback):
    """Fails the run (no retry) when a worker raised a deterministic data error."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            if recurs(error):
                raise DataErrorNotRetried(
                    f"rank {rank} met a data error that a retry would meet again, so the run stops without using "
                    f"train.max_failures: {type(error).__name__}: {error}") from error
