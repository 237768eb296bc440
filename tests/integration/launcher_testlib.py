"""Helpers of the launcher's integration tests: run ``encdec-launch`` as a subprocess from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = [sys.executable, "-m", "encdec.launcher.cli"]


def quick_args(tiles: Path, storage: Path, *extra: str) -> list[str]:
    """CLI arguments running the quickstart recipe on the session tiles, storing runs under ``storage``."""
    return ["recipes/quickstart.yaml", "--storage", str(storage), "--no-progress",
            "--set", f"data.train.tiles={tiles / 'train'}", "--set", f"data.val.tiles={tiles / 'val'}", *extra]


def launch(args: Sequence[str], *, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``encdec-launch ARGS`` as a subprocess from the repository root."""
    return subprocess.run([*LAUNCHER, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def popen(args: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``encdec-launch ARGS`` in the background, output to ``log``."""
    out = open(log, "wb")
    return subprocess.Popen([*LAUNCHER, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def run_dirs(storage: Path) -> list[Path]:
    """Run directories under ``storage``, oldest first."""
    return sorted((p for p in storage.iterdir() if (p / "recipe.yaml").is_file()), key=lambda p: p.stat().st_mtime)
