"""``logs --follow`` on the real targets: a tiny command (validate a recipe) as the launch entry, submitted to the
local two-node Slurm cluster and as a Ray Job to the shared local Ray cluster through ``Backend.submit``, then
followed with ``encdec-launch logs RUN_DIR --follow`` until it ends.

Kubernetes (a stand-in kubectl) and the local target: tests/unit/test_backends.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_backends import _write_recipe, check_entry

from encdec.launcher.rundir import read_launch, write_run_files

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


class _Console:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str) -> None:
        self.lines.append(text)


def _run_dir(tmp_path: Path) -> tuple[Path, Path]:
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_files(run_dir, yaml.safe_load(recipe_path.read_text()), {"mode": "test"})
    return recipe_path, run_dir


def _follow(run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "encdec.launcher.cli", "logs", str(run_dir), "--follow"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.slurm
def test_slurm_logs_follow(tmp_path: Path) -> None:
    from slurm_testlib import ensure_local_slurm

    from encdec.launcher.backends.slurm_backend import Slurm

    ensure_local_slurm()
    _, run_dir = _run_dir(tmp_path)
    flags = argparse.Namespace(cpus_per_task=1, ray_object_store_mb=300, dashboard=False, nodes=1)
    entry = check_entry(run_dir / "recipe.yaml")
    assert Slurm(flags).submit(entry, lambda: run_dir, _Console()) == 0
    assert read_launch(run_dir)["mode"] == "slurm"
    out = _follow(run_dir)
    assert out.returncode == 0, out.stderr
    assert f"{run_dir / 'recipe.yaml'}: ok" in out.stdout, out.stdout[-3000:]
    status = subprocess.run([sys.executable, "-m", "encdec.launcher.cli", "status", str(run_dir)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert "COMPLETED" in status.stdout, status.stdout + status.stderr


def test_ray_job_logs_follow(ray_cluster: object, tmp_path: Path) -> None:
    from encdec.launcher.backends.ray_backend import RayJob

    _, run_dir = _run_dir(tmp_path)
    args = argparse.Namespace(address=ray_cluster.dashboard_url, no_follow=True)  # type: ignore[attr-defined]
    entry = check_entry(run_dir / "recipe.yaml")
    assert RayJob(args).submit(entry, lambda: run_dir, _Console()) == 0
    launch = read_launch(run_dir)
    assert launch["mode"] == "ray-job" and launch["job_id"] == f"encdec-{run_dir.name}"
    out = _follow(run_dir)
    assert out.returncode == 0, out.stderr
    assert "recipe.yaml: ok" in out.stdout, out.stdout[-3000:]
