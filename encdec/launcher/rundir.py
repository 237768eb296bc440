"""Run directories: ``<storage>/<name>-<timestamp>``, one per launch, holding everything about the run.

Layout::

    recipe.yaml        the resolved recipe (defaults filled in, paths absolute, overrides applied)
    launch.json        how it was launched (local/address/job/slurm), the command line, host, Ray job id...
    versions.json      python and package versions, the code revision (git commit, dirty flag)
    checkpoints/       the engine's checkpoints (step_XXXXXXX, best.json)
    metrics.jsonl      every report of rank 0 (the engine appends)
    metrics.csv, metrics.png, export/   written by the driver at the end
    status.json        how the run stands or ended: running / finished / failed / stopped / early-stopped, the
                       reason (the first error, the skipped tiles, the early-stop metric and step), timestamps
    logs/              driver.log (what the driver printed, without colour) and rank<N>.log (each worker's
                       ``encdec`` log lines and its error); ``encdec-launch logs`` merges them by time

Ray Train V2 resumes a run whose ``RunConfig(name, storage_path)`` already exists, silently. The launcher uses
``name = run dir name`` and ``storage_path = its parent``, and a new launch always creates a directory that did
not exist (``mkdir(exist_ok=False)``), so a fresh launch can never pick up another run's state; only
``--resume RUN_DIR`` / ``--run-dir`` point Ray at an existing one, on purpose.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import yaml

from encdec.launcher.recipe.errors import LaunchError

__all__ = [
    "LAUNCH_FILE",
    "LOG_DIR",
    "RECIPE_FILE",
    "STATES",
    "STATUS_FILE",
    "code_revision",
    "describe_status",
    "is_run_dir",
    "new_run_dir",
    "package_versions",
    "print_logs",
    "read_launch",
    "read_status",
    "record_recipe",
    "update_launch",
    "write_run_files",
    "write_status",
]

RECIPE_FILE = "recipe.yaml"
LAUNCH_FILE = "launch.json"
VERSIONS_FILE = "versions.json"
STATUS_FILE = "status.json"
LOG_DIR = "logs"
STATES = ("running", "finished", "failed", "stopped", "early-stopped")
PACKAGES = ("encdec-launch", "torch", "torchvision", "ray", "deepspeed", "peft", "timm", "segmentation-models-pytorch",
            "rasterio", "pydantic", "numpy", "accelerate", "safetensors")


def new_run_dir(storage: str | Path, name: str, *, now: dt.datetime | None = None) -> Path:
    """Create ``<storage>/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when taken). Never reuses a directory."""
    if "://" in str(storage):
        raise LaunchError(
            f"cluster.storage={storage!r} is an object-store URL; checkpoints are written with file paths here. "
            "Use a shared filesystem path (NFS, Lustre, a mounted bucket) reachable from every node"
        )
    root = Path(storage).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        path = root / (f"{name}-{stamp}" if i == 1 else f"{name}-{stamp}-{i}")
        try:
            path.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise LaunchError(f"could not create a new run directory under {root} (1000 taken for {name}-{stamp})")


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run directory (it holds the resolved recipe)."""
    return (Path(path) / RECIPE_FILE).is_file()


def code_revision(start: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the code (and whether the tree has uncommitted changes); empty outside a checkout."""
    where = Path(start or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _recipe_text(recipe_data: Mapping[str, Any]) -> str:
    return ("# resolved recipe of this run (defaults filled in, overrides applied); --resume reads it\n"
            + yaml.safe_dump(dict(recipe_data), sort_keys=False))


def write_run_files(run_dir: Path, recipe_data: Mapping[str, Any], launch: Mapping[str, Any]) -> None:
    """Write ``recipe.yaml``, ``versions.json`` and ``launch.json`` into a run directory."""
    (run_dir / RECIPE_FILE).write_text(_recipe_text(recipe_data))
    versions = {**package_versions(), "code": code_revision()}
    (run_dir / VERSIONS_FILE).write_text(json.dumps(versions, indent=2) + "\n")
    record = {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        **launch,
    }
    (run_dir / LAUNCH_FILE).write_text(json.dumps(record, indent=2) + "\n")


def record_recipe(run_dir: Path, recipe_data: Mapping[str, Any]) -> Path | None:
    """Make ``recipe.yaml`` the recipe a continued run uses (``--resume RUN --set ...``), keeping the one it
    replaces as ``recipe.prev-N.yaml`` (N = 1, 2, ... never overwritten). Returns that file, or None when the
    recipe did not change."""
    current = run_dir / RECIPE_FILE
    old = yaml.safe_load(current.read_text()) if current.is_file() else None
    if old is not None and yaml.safe_dump(old, sort_keys=True) == yaml.safe_dump(dict(recipe_data), sort_keys=True):
        return None
    prev = None
    if current.is_file():
        n = 1
        while (run_dir / f"recipe.prev-{n}.yaml").exists():
            n += 1
        prev = run_dir / f"recipe.prev-{n}.yaml"
        shutil.copy2(current, prev)  # the old text is kept before the new one replaces it
    _atomic_write(current, _recipe_text(recipe_data))
    return prev


def read_launch(run_dir: str | Path) -> dict[str, Any]:
    """The launch record of a run (empty when there is none)."""
    path = Path(run_dir) / LAUNCH_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def update_launch(run_dir: str | Path, **values: Any) -> None:
    """Merge ``values`` into the launch record (e.g. the Ray job id once submitted)."""
    record = read_launch(run_dir)
    record.update(values)
    (Path(run_dir) / LAUNCH_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (None when it has none)."""
    from encdec.train.checkpoint import find_latest_checkpoint

    root = Path(run_dir) / "checkpoints"
    return find_latest_checkpoint(root) if root.is_dir() else None


# ------------------------------------------------------------------------------------------------ status.json
def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``status.json`` (empty when there is none, or it cannot be parsed)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return dict(json.loads(path.read_text())) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def write_status(run_dir: str | Path, state: str, reason: str = "", **details: Any) -> dict[str, Any]:
    """Record how the run stands (``running``) or why it ended, atomically; keeps ``started`` across writes.

    Args:
        run_dir: The run directory.
        state: One of :data:`STATES`.
        reason: One line a user reads first (the first error, what stopped it).
        details: More to keep (``error``: the full error text, ``skipped_tiles``, ``early_stop``...).
    """
    if state not in STATES:
        raise ValueError(f"run state {state!r} is not one of {STATES}")
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    old = read_status(run_dir)
    record: dict[str, Any] = {"state": state, "reason": reason, "started": old.get("started", now), "updated": now}
    if state != "running":
        record["ended"] = now
    record.update(details)
    _atomic_write(Path(run_dir) / STATUS_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return record


def describe_status(run_dir: str | Path | None) -> str | None:
    """``status``'s lines from ``status.json`` (None when the run has none): the state, the reason, the times.

    A recorded ``running`` whose driver (pid in ``launch.json``, on this host) is gone means the driver died
    without recording an end (killed, the machine went down): said so, rather than "running".
    """
    if run_dir is None:
        return None
    st = read_status(run_dir)
    if not st:
        return None
    state = st.get("state", "?")
    from encdec.launcher.backends.ray_backend import driver_alive

    if state == "running" and driver_alive(read_launch(run_dir)) is False:
        state = "ended without recording why (the driver was killed or its machine stopped)"
    lines = [f"state: {state}" + (f" - {st['reason']}" if st.get("reason") else "")]
    when = [f"{k} {st[k]}" for k in ("started", "ended") if st.get(k)]
    if when:
        lines.append(", ".join(when))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ logs/
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def log_files(run_dir: str | Path) -> list[Path]:
    """The run's log files: ``driver.log`` first, then the ranks' in rank order."""
    root = Path(run_dir) / LOG_DIR
    if not root.is_dir():
        return []
    def order(p: Path) -> tuple[int, int, str]:
        digits = re.sub(r"\D", "", p.stem)
        return (0 if p.stem == "driver" else 1, int(digits) if digits else 0, p.name)
    return sorted(root.glob("*.log"), key=order)


def _records(text: str) -> list[str]:
    """Log records: a line starting with a timestamp and the lines after it that do not (a traceback)."""
    out: list[str] = []
    for line in text.splitlines():
        if out and not _STAMP.match(line):
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def _merge(chunks: list[str]) -> list[str]:
    """Records of several files in time order (stable: the driver's first at equal times)."""
    records = [r for text in chunks for r in _records(text)]
    return sorted(records, key=lambda r: r[:23] if _STAMP.match(r) else "")


def _whole(text: str) -> str:
    return text[:text.rfind("\n") + 1]  # a writer may be half-way through a line: it is taken once done


def print_logs(run_dir: Path, *, tail: int | None, follow: bool, out: IO[str],
               alive: Callable[[], bool | None] = lambda: False, poll_s: float = 1.0) -> None:
    """Print a run's driver and worker log lines (``logs/``), merged by time; ``follow``: until ``alive()`` is
    no longer true. A run from before ``logs/`` existed shows its reports (``metrics.jsonl``) instead."""
    legacy = not (run_dir / LOG_DIR).is_dir()
    offsets: dict[Path, int] = {}

    def merge(chunks: list[str]) -> list[str]:
        return "".join(chunks).splitlines() if legacy else _merge(chunks)

    def new_text() -> list[str]:
        chunks = []
        # logs/ is listed again on each poll: a worker's file appears once the worker starts
        for path in ([run_dir / "metrics.jsonl"] if legacy else log_files(run_dir)):
            if not path.is_file():
                continue
            with path.open("rb") as f:
                f.seek(offsets.get(path, 0))
                done = _whole(f.read().decode(errors="replace"))
            offsets[path] = offsets.get(path, 0) + len(done.encode())
            chunks.append(done)
        return chunks

    records = merge(new_text())
    records = records[-tail:] if tail else records
    if records:
        out.write("\n".join(records) + "\n")
        out.flush()
    while follow:
        running = alive()  # read before the files, so the last lines are not missed
        records = merge(new_text())
        if records:
            out.write("\n".join(records) + "\n")
            out.flush()
        if not running:
            return
        time.sleep(poll_s)
