"""What the driver shows and leaves behind: the progress bar, ``metrics.csv``, the loss/mIoU plot, the summary.

``metrics.csv`` and the plot are built from ``metrics.jsonl`` (rank 0's every report, appended by the engine
across restarts and resumes); after a worker-group restart the steps since the last checkpoint are reported
twice, and the later report of a step wins.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["Progress", "metric_rows", "plot_metrics", "skipped_tiles", "summary_table", "write_metrics_csv"]


def _fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "-"


class Progress:
    """A rich progress bar (step/total, loss, mIoU, tiles/s, data-wait %, ETA), or plain lines."""

    def __init__(self, total_steps: int | None, *, enabled: bool = True, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        if console is None and not self.console.is_terminal:
            self.console = Console(stderr=True, width=160)
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
            total = f"/{self.total}" if self.total else ""
            self.console.print(f"step {step}{total}  {self.info()}", highlight=False)

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
