"""Run directories: ``<storage>/<name>-<timestamp>``, one per launch, holding everything about the run.

Layout::

    recipe.yaml        the resolved recipe (defaults filled in, paths absolute, overrides applied)
    launch.json        how it was launched (local/address/job/slurm), the command line, host, Ray job id...
    versions.json      python and package versions, the code revision (git commit, dirty flag)
    checkpoints/       the engine's checkpoints (step_XXXXXXX, best.json)
    metrics.jsonl      every report of rank 0 (the engine appends)
    metrics.csv, metrics.png, export/   written by the driver at the end

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
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from encdec.launcher.recipe.errors import LaunchError

__all__ = [
    "LAUNCH_FILE",
    "RECIPE_FILE",
    "code_revision",
    "is_run_dir",
    "new_run_dir",
    "package_versions",
    "read_launch",
    "update_launch",
    "write_run_files",
]

RECIPE_FILE = "recipe.yaml"
LAUNCH_FILE = "launch.json"
VERSIONS_FILE = "versions.json"
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


def write_run_files(run_dir: Path, recipe_data: Mapping[str, Any], launch: Mapping[str, Any]) -> None:
    """Write ``recipe.yaml``, ``versions.json`` and ``launch.json`` into a run directory."""
    (run_dir / RECIPE_FILE).write_text(
        "# resolved recipe of this run (defaults filled in, overrides applied); --resume reads it\n"
        + yaml.safe_dump(dict(recipe_data), sort_keys=False)
    )
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
