"""The tracker: what rank 0 reports goes, through a bounded queue and one background thread, to every backend.

The driver's main thread only ever calls :meth:`Tracker.log` (a ``put_nowait``) and, at the end, :meth:`finish`
(bounded by ``flush_timeout_s``), so a backend that is slow, down or misconfigured never stops or slows training:
opening it, logging to it and closing it all happen in the background thread. Each backend's first failure is
reported once (later ones are counted), and a backend that cannot even open is left out for the rest of the run.

Steps are never sent twice: a resumed run (or a worker-group restart) re-reports the steps since its last
checkpoint, and each metric key's highest step already sent - at start, the highest in ``metrics.jsonl`` from the
run's earlier launches - is a watermark below which reports of that key are dropped.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from encdec.config.checks import is_number

__all__ = ["RunInfo", "Sink", "Tracker", "numeric_metrics", "watermarks_from_jsonl"]

LOG = logging.getLogger("encdec.track")
_SKIP = {"step"}


@dataclass
class RunInfo:
    """What every backend is told when it opens."""

    run_dir: Path
    run_name: str
    recipe: dict[str, Any]
    resumed: bool
    versions: dict[str, str] = field(default_factory=dict)


class Sink(Protocol):
    """One tracking backend. Every method runs in the tracker's background thread and may raise."""

    name: str

    def open(self, info: RunInfo) -> None:
        """Connect, create or continue the run, record the recipe."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """One report's numeric metrics at ``step``."""

    def finish(self, status: str, files: Mapping[str, Path]) -> None:
        """Upload the end-of-run files (plot, metrics.csv, exported model) and close with ``status``."""


def numeric_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The trackable part of a report: finite numbers (not ``step``, not flags)."""
    out: dict[str, float] = {}
    for k, v in report.items():
        if k in _SKIP or not is_number(v):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def watermarks_from_jsonl(path: Path) -> dict[str, int]:
    """Each metric's highest step in a run's ``metrics.jsonl`` (what earlier launches of the run already sent)."""
    marks: dict[str, int] = {}
    if not path.is_file():
        return marks
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row.get("step", 0))
        except (ValueError, TypeError, AttributeError):  # a line cut by a crash mid-write
            continue
        for k in numeric_metrics(row):
            marks[k] = max(marks.get(k, -1), step)
    return marks


@dataclass
class _State:
    failures: int = 0
    disabled: bool = False
    sent: int = 0


class Tracker:
    """Fan rank 0's reports out to the configured backends without ever blocking the caller.

    Args:
        sinks: the backends (opened in the background thread).
        info: the run they are told about.
        queue_size: reports held for slow backends; beyond it the oldest are dropped (and counted).
        flush_timeout_s: how long :meth:`finish` waits for the backends.
        on_problem: called (from any thread) with a one-line message the first time each backend fails.
        watermarks: per metric, the highest step already sent (steps at or below it are not sent again).
    """

    def __init__(self, sinks: list[Any], info: RunInfo, *, queue_size: int = 10000, flush_timeout_s: float = 30.0,
                 on_problem: Callable[[str], None] | None = None, watermarks: dict[str, int] | None = None) -> None:
        self.sinks = list(sinks)
        self.info = info
        self.flush_timeout_s = flush_timeout_s
        self.on_problem = on_problem
        self.marks: dict[str, int] = dict(watermarks or {})
        self.dropped = 0
        self.problems: list[str] = []
        self.state = {s.name: _State() for s in self.sinks}
        self._queue: queue.Queue[tuple[str, Any, Any]] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="encdec-tracking", daemon=True)
        self._finished = threading.Event()
        self._thread.start()

    # ------------------------------------------------------------------------------------------- caller side
    def log(self, report: Mapping[str, Any]) -> None:
        """Queue one report of rank 0 (never blocks; drops the oldest report when the queue is full)."""
        try:
            step = int(report.get("step", 0))
        except (TypeError, ValueError):
            return
        metrics = {k: v for k, v in numeric_metrics(report).items() if step > self.marks.get(k, -1)}
        if not metrics:
            return
        for k in metrics:
            self.marks[k] = step
        self._put(("metrics", step, metrics))

    def _put(self, item: tuple[str, Any, Any]) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def finish(self, status: str, files: Mapping[str, Path | None] | None = None) -> bool:
        """Send the end-of-run files and ``status``, then wait at most ``flush_timeout_s``.

        Returns:
            True when every backend finished in time (a backend still busy is abandoned: its thread is a daemon).
        """
        present = {k: Path(v) for k, v in (files or {}).items() if v is not None and Path(v).exists()}
        self._put(("finish", status, present))
        self._finished.wait(timeout=self.flush_timeout_s)
        if not self._finished.is_set():
            self._problem(f"tracking: the backends did not finish within {self.flush_timeout_s:g} s "
                          "(track.flush_timeout_s); what was not sent is still in metrics.jsonl")
            return False
        if self.dropped:
            self._problem(f"tracking: {self.dropped} reports were dropped because a backend was too slow "
                          "(raise track.queue_size)")
        for name, st in self.state.items():
            if st.failures > 1:
                self._problem(f"tracking: {name} failed {st.failures} times in this run")
        return True

    # ------------------------------------------------------------------------------------------- background
    def _problem(self, message: str) -> None:
        self.problems.append(message)
        if self.on_problem is None:
            LOG.warning("%s", message)
            return
        try:
            self.on_problem(message)
        except Exception:  # a broken console must not break tracking
            LOG.warning("%s", message)

    def _call(self, sink: Any, what: str, *args: Any) -> None:
        st = self.state[sink.name]
        if st.disabled:
            return
        try:
            getattr(sink, what)(*args)
            st.sent += 1
        except Exception as err:  # any backend error: report the first, count the rest, keep training
            st.failures += 1
            if what == "open":
                st.disabled = True
            if st.failures == 1:
                tail = ("; training continues without it" if what == "open" else
                        "; training continues (further errors of this backend are counted, not printed)")
                self._problem(f"tracking: {sink.name} {_VERB[what]} failed: {type(err).__name__}: "
                              f"{_one_line(str(err))}{tail}")

    def _work(self) -> None:
        for sink in self.sinks:
            self._call(sink, "open", self.info)
        while True:
            kind, a, b = self._queue.get()
            if kind == "metrics":
                for sink in self.sinks:
                    self._call(sink, "log_metrics", a, b)
            elif kind == "finish":
                for sink in self.sinks:
                    self._call(sink, "finish", a, b)
                self._finished.set()
                return


_VERB = {"open": "open", "log_metrics": "log", "finish": "finish"}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def wait_idle(tracker: Tracker, timeout: float = 10.0) -> None:
    """Wait until the queue is empty (tests)."""
    deadline = time.monotonic() + timeout
    while not tracker._queue.empty() and time.monotonic() < deadline:
        time.sleep(0.02)
