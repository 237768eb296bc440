"""Bad tiles: skipped, counted and logged with path and reason; past ``max_bad_fraction`` the run stops clearly.

A long run must never crash on one bad file, and must not silently train on a broken data set either. Each rank
keeps its own tracker (reads are local); a tile is counted once however many epochs meet it, and a known-bad tile
is not re-read.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

LOG = logging.getLogger("encdec.data")

REASONS = ("unreadable", "band-count", "band-name", "frames", "size", "mask-mismatch", "all-nodata")


class BadTileError(Exception):
    """One sample cannot be used. ``reason`` is one of ``REASONS``; the message says why."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[BadTileError], tuple[str, str, str]]:
        return (type(self), (self.path, self.reason, self.detail))  # picklable (sent to Ray tasks)


class TooManyBadTilesError(RuntimeError):
    """More bad tiles than ``data.max_bad_fraction`` allows."""


class BadTileTracker:
    """Counts bad tiles per reason and enforces the ceiling.

    Args:
        expected_reads: Samples this rank reads per epoch; the ceiling is ``max_bad_fraction`` of it.
        max_bad_fraction: Allowed fraction of bad samples (``data.max_bad_fraction``).
        split: Split name, for messages.
    """

    def __init__(self, expected_reads: int, max_bad_fraction: float, split: str = "train") -> None:
        self.expected_reads = max(1, expected_reads)
        self.max_bad_fraction = max_bad_fraction
        self.split = split
        self.counts: Counter[str] = Counter()
        self.bad: dict[str, BadTileError] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        """Largest number of distinct bad samples tolerated on this rank."""
        return int(self.max_bad_fraction * self.expected_reads)

    def is_known_bad(self, key: str) -> bool:
        """Whether a sample was already found bad (so it is skipped without another read)."""
        return key in self.bad

    def record(self, key: str, error: BadTileError) -> None:
        """Count and log one bad sample; raise once the ceiling is passed.

        Raises:
            TooManyBadTilesError: When the distinct bad samples exceed ``max_bad_fraction`` of the reads.
        """
        with self._lock:
            if key in self.bad:
                return
            self.bad[key] = error
            self.counts[error.reason] += 1
            total = len(self.bad)
        LOG.warning("skipping bad tile (%s) %s: %s", error.reason, error.path, error.detail)
        if total > self.limit:
            examples = "; ".join(str(e) for e in list(self.bad.values())[:5])
            raise TooManyBadTilesError(
                f"{total} bad tiles in data.{self.split} exceed data.max_bad_fraction={self.max_bad_fraction} "
                f"(at most {self.limit} of {self.expected_reads} samples read per epoch on this rank). "
                f"By reason: {dict(self.counts)}. First ones: {examples}. Fix: repair or remove these files, "
                f"or raise data.max_bad_fraction if they are expected."
            ) from error

    def summary(self) -> dict[str, int]:
        """Counts per reason plus ``total``."""
        with self._lock:
            return {**dict(self.counts), "total": len(self.bad)}
