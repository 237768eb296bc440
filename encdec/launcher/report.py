"""What the driver shows and leaves behind: the progress bar, ``metrics.csv``, the loss/mIoU plot, the summary.

``metrics.csv`` and the plot are built from ``metrics.jsonl`` (rank 0's every report, appended by the engine
across restarts and resumes); after a worker-group restart the steps since the last checkpoint are reported
twice, and the later report of a step wins.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from encdec.config.checks import is_number

__all__ = ["SUMMARY_WIDTH", "Progress", "RunLog", "end_of_run", "error_reason", "make_console", "metric_rows",
           "plot_metrics", "skipped_tiles", "summary_table", "write_metrics_csv"]


SUMMARY_WIDTH = 100  # the summary table's width in logs (files, CI): no line wider than this


def make_console(*, stderr: bool = False, width: int = 160) -> Any:
    """A rich console: colours on a terminal; on anything else (a log file, a pipe, CI) plain text, ``width``
    columns (long paths are not cut at 80), and no colour codes even under ``FORCE_COLOR``."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, width=width, force_terminal=False, color_system=None)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if is_number(value) and math.isfinite(value):
        return format(value, spec)
    return "-"


class Progress:
    """A rich progress bar (step/total, loss, mIoU, tiles/s, data-wait %, ETA), or plain lines."""

    def __init__(self, total_steps: int | None, *, enabled: bool = True, console: Any = None) -> None:
        self.console = console or make_console(stderr=True)
        self.total = total_steps
        self.enabled = enabled and self.console.is_terminal
        self.plain = not self.enabled
        self.state: dict[str, Any] = {}
        self._bar: Any = None
        self._task: Any = None
        self._last_plain = 0.0

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("[bold]train"), BarColumn(bar_width=16), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TextColumn("ETA"), TimeRemainingColumn(),
                            console=self.console, refresh_per_second=4)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, info="starting workers...")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def info(self) -> str:
        s = self.state
        parts = [f"loss {_fmt(s.get('train/loss'), '.3f')}"]
        if "val/mIoU" in s:
            parts.append(f"mIoU {_fmt(s.get('val/mIoU'), '.3f')}")
        elif "val/rmse" in s:
            parts.append(f"rmse {_fmt(s.get('val/rmse'), '.3f')}")
        elif "val/accuracy" in s:
            parts.append(f"acc {_fmt(s.get('val/accuracy'), '.3f')}")
        parts.append(f"{_fmt(s.get('train/tiles_per_s'), '.0f')} tiles/s")
        parts.append(f"data-wait {_fmt(s.get('train/data_wait_pct'), '.0f')}%")
        bad, empty = int(s.get("data/bad_tiles") or 0), int(s.get("data/empty_tiles") or 0)
        if bad or empty:
            parts.append(f"skipped {empty} empty + {bad} bad tiles")
        return " ".join(parts)

    def update(self, metrics: dict[str, Any]) -> None:
        """Take one report of rank 0."""
        self.state.update({k: v for k, v in metrics.items() if v is not None})
        step = int(metrics.get("step", 0) or 0)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self.info())
        elif time.monotonic() - self._last_plain > 0.0:
            self._last_plain = time.monotonic()
            self.console.print(self.line(step), highlight=False)

    def line(self, step: int | None = None) -> str:
        """The plain progress line of the last report (also what the driver's log gets)."""
        total = f"/{self.total}" if self.total else ""
        return f"step {int(self.state.get('step', 0) or 0) if step is None else step}{total}  {self.info()}"

    def message(self, text: str) -> None:
        """A line above the bar."""
        self.console.print(text, highlight=False)


def skipped_tiles(path: Path) -> tuple[dict[str, int], list[str]]:
    """Counts per reason and the first few lines of a run's ``skipped_tiles.csv`` (``({}, [])`` when none)."""
    import csv

    if not path.is_file():
        return {}, []
    counts: dict[str, int] = {}
    first: list[str] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            counts[row["reason"]] = counts.get(row["reason"], 0) + 1
            if len(first) < 3:
                first.append(f"{row['file']} ({row['reason']}: {row['detail']})")
    return counts, first


def metric_rows(jsonl: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` merged per step (train and val reports of a step in one row; later wins)."""
    if not jsonl.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in jsonl.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        step = int(m.get("step", 0))
        by_step.setdefault(step, {}).update(m)
    return [by_step[s] for s in sorted(by_step)]


def write_metrics_csv(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    """One row per step, one column per metric (``step`` first)."""
    rows = list(rows)
    keys: list[str] = ["step"]
    for r in rows:
        keys += [k for k in r if k not in keys and not isinstance(r[k], (dict, list))]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def plot_metrics(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Loss curves (train, val) and the validation metric (mIoU / accuracy / RMSE) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    if not rows:
        return None
    metric = next((k for k in ("val/mIoU", "val/accuracy", "val/rmse") if any(k in r for r in rows)), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.get_legend_handles_labels()[0]:  # a run with no loss report yet has nothing to label (matplotlib warns)
        ax.legend()
    ax.grid(alpha=0.3)
    if metric:
        xs, ys = series(metric)
        axes[0][1].plot(xs, ys, "o-", color="tab:green")
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel(metric)
        axes[0][1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_table(title: str, rows: list[tuple[str, str]]) -> Any:
    """A two-column rich table."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # long paths wrap rather than end in an ellipsis
    for k, v in rows:
        table.add_row(k, v)
    return table


# ------------------------------------------------------------------------------------------------ why it ended
def _root_error(err: BaseException) -> BaseException:
    """The error a user should read first: a failing worker's own exception rather than Ray's wrapper, following
    the lowest failing rank (``worker_failures``), Ray's task-error ``cause`` and the ``__cause__`` chain."""
    seen: set[int] = set()
    e = err
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, Mapping) and failures:
            e = failures[min(failures)]
            continue
        inner = getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else e.__cause__
        if inner is None:
            break
        e = inner
    return e


def error_reason(err: BaseException) -> tuple[str, str]:
    """(one line naming the first error, its full text) for ``status.json`` and the driver's log."""
    root = _root_error(err)
    text = str(root).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = f"{type(root).__name__}: {first}" if first else type(root).__name__
    full = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return line[:1000], full[-20000:]


def end_of_run(*, failed: BaseException | None, stopped: bool, rows: list[dict[str, Any]], max_steps: int | None,
               skips: Mapping[str, int], early_stop: Any = None) -> tuple[str, str, dict[str, Any]]:
    """How a run ended, for ``status.json``: (state, reason, details).

    Args:
        failed: The error ``fit`` ended with, if any.
        stopped: A stop was requested (Ctrl-C, SIGTERM, ``encdec-launch stop``).
        rows: ``metric_rows`` of the run.
        max_steps: ``train.max_steps``.
        skips: Skipped tiles per reason (``skipped_tiles``).
        early_stop: ``train.early_stop`` (its metric names the value that stopped the run).
    """
    last = rows[-1] if rows else {}
    step = int(last.get("step", 0) or 0)
    details: dict[str, Any] = {"step": step, "max_steps": max_steps}
    skipped = ""
    if skips:
        details["skipped_tiles"] = dict(skips)
        skipped = (f"; skipped {sum(skips.values())} tiles ("
                   + ", ".join(f"{r} {n}" for r, n in sorted(skips.items())) + ", see skipped_tiles.csv)")
    if failed is not None:
        reason, full = error_reason(failed)
        details["error"] = full
        return "failed", f"{reason} (at step {step}){skipped}", details
    if stopped:
        return "stopped", f"stop requested at step {step}; continue with --resume{skipped}", details
    if last.get("status") == "early-stopped":
        metric = getattr(early_stop, "metric", None)
        value = last.get(metric) if metric else None
        details["early_stop"] = {"metric": metric, "step": step, "value": value,
                                 "patience": getattr(early_stop, "patience", None)}
        shown = f" = {value:.4g}" if isinstance(value, (int, float)) else ""
        return ("early-stopped", f"train.early_stop: {metric}{shown} had not improved for "
                f"{getattr(early_stop, 'patience', '?')} validations at step {step}{skipped}", details)
    ended = f"{step} steps" if not max_steps or step >= max_steps else f"ended at step {step} of {max_steps}"
    return "finished", f"{ended}{skipped}", details


_MARKUP = re.compile(r"\[/?(?:bold|red|yellow|green|dim)\]")


class RunLog:
    """The driver's lines in ``RUN_DIR/logs/driver.log``: what it printed (plain text, never colour codes) and its
    ``encdec`` warnings, each with a timestamp, so ``encdec-launch logs`` can merge them with the workers' lines.
    """

    def __init__(self, run_dir: Path) -> None:
        (run_dir / "logs").mkdir(exist_ok=True)
        self.handler = logging.FileHandler(run_dir / "logs" / "driver.log", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s driver %(levelname)s %(message)s"))
        self.logger = logging.getLogger("encdec.launcher.run")
        self.logger.setLevel(logging.INFO)
        logging.getLogger("encdec").addHandler(self.handler)

    def line(self, text: str, level: int = logging.INFO) -> None:
        """One line (the colour markup the console gets, if any, is dropped)."""
        self.logger.log(level, _MARKUP.sub("", text))

    def close(self) -> None:
        logging.getLogger("encdec").removeHandler(self.handler)
        self.handler.close()
