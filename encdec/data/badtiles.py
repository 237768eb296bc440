"""Bad tiles: skipped, counted and logged with path and reason; past ``max_bad_fraction`` the run stops clearly.

A long run must never crash on one bad file, and must not silently train on a broken data set either. Each rank
keeps its own tracker (reads are local); a tile is counted once however many epochs meet it, and a known-bad tile
is not re-read.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
from collections import Counter

LOG = logging.getLogger("encdec.data")

REASONS = ("unreadable", "band-count", "band-name", "frames", "size", "mask-mismatch", "all-nodata", "nearly-empty")
EMPTY_REASONS = ("all-nodata", "nearly-empty")  # skipped as empty, never counted against max_bad_fraction


class BadTileError(Exception):
    """One sample cannot be used. ``reason`` is one of ``REASONS``; the message says why."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[BadTileError], tuple[str, str, str]]:
        return (type(self), (self.path, self.reason, self.detail))  # picklable (sent to Ray tasks)


class EmptyTileError(BadTileError):
    """A sample with no (or too little) valid data: skipped as empty, not counted as bad (reason in EMPTY_REASONS)."""


class TooManyBadTilesError(RuntimeError):
    """More bad tiles than ``data.max_bad_fraction`` allows."""


def recurs(error: BaseException) -> bool:
    """Whether an error is a deterministic data error that a retry would meet again (a setting that cannot work,
    too many bad tiles): the launcher fails the run at once instead of restarting the workers. The cause chain
    is searched, so a wrapped data error counts too."""
    from encdec.data.config import DataConfigError

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, (DataConfigError, TooManyBadTilesError)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class BadTileTracker:
    """Counts bad and empty tiles per reason, enforces the ceiling on bad ones, and lists every skip.

    Empty tiles (``EmptyTileError``: all nodata, or below ``data.min_valid_fraction``) are skipped and listed but
    do not count against ``max_bad_fraction``: nodata borders are normal in real scenes. Each skip is appended to
    ``skipped_csv`` (``file,reason,rank,step,detail``; one file shared by all ranks, lines appended whole), and
    the first ``WARN_FIRST`` are logged as warnings, the rest at debug level.

    Args:
        expected_reads: Samples this rank reads per epoch; the ceiling is ``max_bad_fraction`` of it.
        max_bad_fraction: Allowed fraction of bad samples (``data.max_bad_fraction``).
        split: Split name, for messages.
        rank: This rank, written into the CSV.
        skipped_csv: The run directory's ``skipped_tiles.csv``, or ``None`` (no file).
    """

    WARN_FIRST = 5

    def __init__(self, expected_reads: int, max_bad_fraction: float, split: str = "train", *, rank: int = 0,
                 skipped_csv: str | None = None) -> None:
        self.expected_reads = max(1, expected_reads)
        self.max_bad_fraction = max_bad_fraction
        self.split = split
        self.rank = rank
        self.skipped_csv = skipped_csv
        self.counts: Counter[str] = Counter()
        self.bad: dict[str, BadTileError] = {}
        self.empty: dict[str, BadTileError] = {}
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
        """Whether a sample was already found bad or empty (so it is skipped without another read)."""
        return key in self.bad or key in self.empty

    def record(self, key: str, error: BadTileError, step: int | None = None) -> None:
        """Count and log one skipped sample; raise once the bad ones pass the ceiling.

        Args:
            key: The sample's identity (``Sample.key``).
            error: Why it is skipped.
            step: The optimizer step whose batch met it (``None``: unknown).

        Raises:
            TooManyBadTilesError: When the distinct bad samples exceed ``max_bad_fraction`` of the reads.
        """
        empty = isinstance(error, EmptyTileError)
        with self._lock:
            if key in self.bad or key in self.empty:
                return
            (self.empty if empty else self.bad)[key] = error
            self.counts[error.reason] += 1
            total = len(self.bad)
            seen = len(self.bad) + len(self.empty)
            self._append_csv(error, step)
        kind = "empty" if empty else "bad"
        log = LOG.warning if seen <= self.WARN_FIRST else LOG.debug
        log("skipping %s tile (%s) %s: %s%s", kind, error.reason, error.path, error.detail,
            " (further skips at debug level; all are in skipped_tiles.csv)" if seen == self.WARN_FIRST else "")
        if not empty and total > self.limit:
            examples = "; ".join(str(e) for e in list(self.bad.values())[:5])
            raise TooManyBadTilesError(
                f"{total} bad tiles in data.{self.split} exceed data.max_bad_fraction={self.max_bad_fraction} "
                f"(at most {self.limit} of {self.expected_reads} samples read per epoch on this rank). "
                f"By reason: {dict(self.counts)}. First ones: {examples}. Fix: repair or remove these files, "
                f"or raise data.max_bad_fraction if they are expected."
            ) from error

    def _append_csv(self, error: BadTileError, step: int | None) -> None:
        if self.skipped_csv is None:
            return
        buf = io.StringIO()
        csv.writer(buf).writerow([error.path, error.reason, self.rank, "" if step is None else step, error.detail])
        try:
            # O_APPEND: each rank's whole line lands at the end; the header is written by whoever creates the file.
            fd = os.open(self.skipped_csv, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, ("file,reason,rank,step,detail\r\n" + buf.getvalue()).encode())
        except FileExistsError:
            fd = os.open(self.skipped_csv, os.O_WRONLY | os.O_APPEND)
            os.write(fd, buf.getvalue().encode())
        except OSError as e:  # the list is a convenience: a read-only run dir must not stop training
            LOG.debug("cannot write %s: %s", self.skipped_csv, e)
            return
        os.close(fd)

    def summary(self) -> dict[str, int]:
        """Counts per reason plus ``total`` (bad tiles) and ``empty`` (empty tiles skipped)."""
        with self._lock:
            return {**dict(self.counts), "total": len(self.bad), "empty": len(self.empty)}
