"""Helpers shared by the backends: the recipe as flat params, package versions, the run's ``tracking.json``."""

from __future__ import annotations

import json
import platform
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["STATE_FILE", "flatten", "read_state", "recipe_text", "update_state", "versions"]

STATE_FILE = "tracking.json"  # per run: the backends' run ids, so a resumed run continues the same runs
_LOCK = threading.Lock()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": "0.001"}`` (lists as JSON, None as ``null``)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value)
        else:
            out[name] = "null" if value is None else str(value)
    return out


def recipe_text(recipe: Mapping[str, Any]) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(dict(recipe), sort_keys=False)


def versions() -> dict[str, str]:
    """Versions of what trained the model (recorded with the run)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("encdec-launch", "torch", "ray", "timm", "peft", "deepspeed"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def read_state(run_dir: Path) -> dict[str, Any]:
    """``<run_dir>/tracking.json`` ({} when absent or unreadable)."""
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_state(run_dir: Path, backend: str, values: Mapping[str, Any]) -> None:
    """Record a backend's run ids in ``<run_dir>/tracking.json`` (never credentials)."""
    with _LOCK:
        state = read_state(run_dir)
        state[backend] = {**state.get(backend, {}), **values}
        tmp = run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(run_dir / STATE_FILE)
